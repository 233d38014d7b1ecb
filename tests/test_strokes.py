"""strokes and the live-drawing handler: a stroke travels compactly, and a canvas drawn from
strokes on the server holds the pixels of the PNG a client renders from the same strokes."""

from __future__ import annotations

import ast
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from digitserve import archive, draw, handler, live, preprocessing, strokes
from digitserve.live_handler import LiveDrawingHandler
from digitserve.model import DigitCNN, for_serving

pytestmark = pytest.mark.unit


def test_binary_stroke_is_four_bytes_a_point_and_round_trips() -> None:
    points = [[0, 0], [279, 1], [140.4, 139.6], [65535, 3]]
    data = strokes.encode(points)
    assert len(data) == 4 * len(points)
    assert strokes.decode(data).tolist() == [[0, 0], [279, 1], [140, 140], [65535, 3]]


def test_json_stroke_reads_the_same_points() -> None:
    points = [[10, 20], [30, 40]]
    for payload in (json.dumps(points), json.dumps(points).encode(), points):
        assert strokes.decode(payload).tolist() == points


@pytest.mark.parametrize(("payload", "message"), [
    (b"", "4 bytes a point"),
    (b"\x01\x02\x03", "4 bytes a point"),
    ("[[1, 2], [3]]", "list of \\[x, y\\] pairs"),
    ("[1, 2, 3]", "pairs"),
    ("[[1, 2", "neither binary nor JSON"),
    ("[]", "pairs"),
    ('[["a", "b"]]', "pairs of numbers"),
    ("[[NaN, 1]]", "finite"),
    (strokes.encode([[1, 1]] * (strokes.MAX_POINTS + 1)), "over the limit"),
])
def test_unreadable_strokes_say_why(payload, message) -> None:
    with pytest.raises(strokes.StrokeError, match=message):
        strokes.decode(payload)


def test_scripted_drawing_looks_like_a_mouse_and_matches_the_png() -> None:
    drawing = live.scripted_drawing()
    assert len(drawing) >= 5
    for stroke in drawing:
        steps = np.diff(np.asarray(stroke, dtype=float), axis=0)
        assert np.hypot(*steps.T).max() <= live.POINT_SPACING_PX + 1.5
    with Image.open(io.BytesIO(live.canvas_png(drawing))) as png:
        assert np.array_equal(np.asarray(png), np.asarray(strokes.render(drawing)))


def test_png_from_strokes_is_the_same_rasteriser() -> None:
    fractions = draw.EXAMPLE_STROKES[7]
    pixels = [[(x * draw.CANVAS_PIXELS, y * draw.CANVAS_PIXELS) for x, y in s] for s in fractions]
    with Image.open(io.BytesIO(draw.png_from_strokes(fractions))) as png:
        assert np.array_equal(np.asarray(png), np.asarray(strokes.render(pixels)))


def test_canvas_store_clears_forgets_and_drops_the_least_recent() -> None:
    store = strokes.CanvasStore(max_canvases=2)
    line = np.array([[50.0, 50.0], [200.0, 200.0]])
    assert store.apply("a", line)[1] == 1
    assert store.apply("a", line)[1] == 2
    canvas, count = store.apply("a", None, clear=True)
    assert count == 0 and np.asarray(canvas).min() == 255
    store.apply("b", line)
    store.apply("c", line)  # "a" is now the least recently used of three
    assert len(store) == 2 and not store.forget("a") and store.forget("b")


def test_idle_canvases_expire() -> None:
    store = strokes.CanvasStore(idle_s=0.0)
    store.apply("a", np.array([[1.0, 1.0]]))
    store.apply("b", np.array([[1.0, 1.0]]))
    assert not store.forget("a")


# -- the handler, in-process, with a real (untrained) network ----------------------------------
class Context:
    """What TorchServe's context gives a handler: a sequence id per request, no headers."""

    def __init__(self, sequence_ids: list[str | None]) -> None:
        self.sequence_ids = sequence_ids

    def get_sequence_id(self, index: int) -> str | None:
        return self.sequence_ids[index]

    def get_request_header(self, index: int, key: str) -> None:
        return None


@pytest.fixture(scope="module")
def live_handler() -> LiveDrawingHandler:
    torch.manual_seed(0)
    served = LiveDrawingHandler()
    served.device, served.version = torch.device("cpu"), "1.0"
    served.model = for_serving(DigitCNN(), preprocessing.IMAGE_SIZE)
    served.canvases = strokes.CanvasStore()
    return served


def answer(served: LiveDrawingHandler, requests: list[dict], ids: list[str | None]) -> list:
    return [json.loads(body) for body in served.handle(requests, Context(ids))]


def test_each_stroke_answers_for_the_canvas_so_far_as_digitmodel_would(live_handler) -> None:
    drawing = live.scripted_drawing()
    for n, points in enumerate(drawing, start=1):
        (got,) = answer(live_handler, [{"stroke": strokes.encode(points)}], ["s1"])
        digit = preprocessing.digit_from_payload(live.canvas_png(drawing[:n]))
        row = live_handler.predict_probabilities(torch.from_numpy(digit[None]))[0].tolist()
        assert got == {**live_handler.answer(row), "strokes": n}
    assert handler.DigitHandler.answer is LiveDrawingHandler.answer


def test_sequences_in_one_batch_keep_their_own_canvases(live_handler) -> None:
    first, second = live.scripted_drawing()[:2]
    got = answer(live_handler,
                 [{"stroke": strokes.encode(first)}, {"stroke": json.dumps(second).encode()},
                  {"stroke": strokes.encode(second)}],
                 ["x", "y", "x"])
    assert [a["strokes"] for a in got] == [1, 1, 2]


def test_bad_requests_get_an_error_answer_never_an_exception(live_handler) -> None:
    got = answer(live_handler, [
        {"stroke": b"\x01\x02\x03"},
        {"data": b"a PNG"},
        {"stroke": strokes.encode([[1, 1]])},
        {"clear": b"1"},
        {"stroke": strokes.encode([[140, 140]])},
    ], ["e1", "e2", None, "e3", "e4"])
    assert [a["code"] for a in got[:4]] == [400] * 4
    assert "4 bytes a point" in got[0]["error"]
    assert "keys received: data" in got[1]["error"]
    assert "sequence_id" in got[2]["error"]
    assert "holds no digit" in got[3]["error"]  # an empty canvas
    assert got[4]["strokes"] == 1  # a dot is a digit's worth of ink


def test_clear_and_end(live_handler) -> None:
    dot = strokes.encode([[140, 100], [140, 180]])
    answer(live_handler, [{"stroke": dot}], ["c"])
    (cleared,) = answer(live_handler, [{"stroke": dot, "clear": b"1"}], ["c"])
    assert cleared["strokes"] == 1
    (last,) = answer(live_handler, [{"stroke": dot, "end": b"1"}], ["c"])
    assert last["strokes"] == 2
    assert answer(live_handler, [{"end": b"1"}], ["c"]) == [{"ended": False}]
    answer(live_handler, [{"stroke": dot}], ["d"])
    assert answer(live_handler, [{"end": b"1"}], ["d"]) == [{"ended": True}]


@pytest.mark.parametrize("path", [archive.LIVE_HANDLER_FILE, *archive.LIVE_EXTRA_FILES],
                         ids=lambda path: path.name)
def test_archived_live_files_do_not_import_the_package(path: Path) -> None:
    """Inside the .mar only the archived files exist: no ``digitserve`` import."""
    for node in ast.walk(ast.parse(Path(path).read_text())):
        if isinstance(node, ast.Import):
            assert not any(a.name.split(".")[0] == "digitserve" for a in node.names), path
        if isinstance(node, ast.ImportFrom) and node.level == 0:
            assert (node.module or "").split(".")[0] != "digitserve", path
