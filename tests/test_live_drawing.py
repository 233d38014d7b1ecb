"""Live drawing against a real TorchServe: digitmodel and the stateful digitlive side by side,
strokes over real StreamPredictions2, whole canvases over real REST, bytes counted on the wire."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from matplotlib.figure import Figure

from digitserve import archive, draw, live, strokes
from digitserve.client import DigitClient, InvalidInputError
from digitserve.config import LIVE_BATCH_SIZE, LIVE_MODEL_NAME
from digitserve.server import TorchServe, free_ports

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def live_server(model_store: Path, tmp_path_factory: pytest.TempPathFactory,
                server_group_recorder):
    """A TorchServe serving the session's model twice: digitmodel and digitlive."""
    store = tmp_path_factory.mktemp("live_store")
    shutil.copy(model_store / f"{archive.ARCHIVE_NAME}.mar", store)
    settings = live.live_server_settings(ports=free_ports(), model_store=store,
                                         run_dir=tmp_path_factory.mktemp("live_run"))
    assert (store / live.LIVE_MODEL_MAR).is_file()
    ts = TorchServe(settings).start()
    server_group_recorder(ts.process.pid)
    yield ts
    ts.stop()


@pytest.fixture
def client(live_server: TorchServe):
    with DigitClient.for_run_dir(live_server.run_dir) as opened:
        yield opened


def test_every_stroke_is_answered_as_rest_answers_the_whole_canvas(live_server) -> None:
    run = live.run_live_drawing(live_server.run_dir, rounds=1)
    summary = run.summary()
    drawing = live.scripted_drawing()
    assert summary["strokes"] == len(drawing) == len(summary["answers"]) >= 5
    assert [a["stroke"] for a in summary["answers"]] == list(range(1, len(drawing) + 1))
    assert all(a["same_as_rest"] for a in summary["answers"]), summary["answers"]
    for record, points in zip(run.strokes, drawing, strict=True):
        assert record.points == len(points)
        assert record.grpc_message_bytes < 4 * len(points) + 64  # the points and an envelope
        assert record.grpc_wire[0] < record.rest_wire[0]  # a stroke is smaller than a canvas
    assert [r.png_bytes for r in run.strokes] == [
        len(live.canvas_png(drawing[:n])) for n in range(1, len(drawing) + 1)]
    assert run.connections == {"grpc": 1, "rest": 1}
    assert summary["bytes_grpc"] < summary["bytes_rest"]
    assert len(run.ms_grpc) == len(run.ms_rest) == len(drawing)


def test_measure_live_drawing_gives_the_agreed_keys(live_server) -> None:
    figures = live.measure_live_drawing(live_server.run_dir, rounds=1)
    assert set(figures) == {"strokes", "answers", "bytes_grpc", "bytes_rest",
                            "ms_per_update_grpc", "ms_per_update_rest"}
    assert figures["ms_per_update_grpc"] > 0 and figures["ms_per_update_rest"] > 0


def test_the_canvas_belongs_to_the_sequence_not_the_call(client) -> None:
    first, second, third = live.scripted_drawing()[:3]
    session = live.LiveDrawing(client, sequence_id="kept-across-calls")
    assert session.send(first).strokes == 1
    session.close(end=False)  # the call ends, the canvas stays
    with live.LiveDrawing(client, sequence_id="kept-across-calls") as again:
        assert again.send(second).strokes == 2
        again.clear()
        assert again.send(third).strokes == 1


def test_a_bad_stroke_gets_an_error_and_the_drawing_goes_on(client) -> None:
    with live.LiveDrawing(client) as session:
        with pytest.raises(InvalidInputError, match="4 bytes a point"):
            session.send(b"\x01\x02\x03")
        with pytest.raises(InvalidInputError, match="over the limit"):
            session.send([[1, 1]] * (strokes.MAX_POINTS + 1))
        answer = session.send(live.scripted_drawing()[0])
        assert answer.strokes == 1 and 0 <= answer.prediction.digit <= 9


def test_two_drawings_at_once_keep_apart(client) -> None:
    drawing = live.scripted_drawing()
    with live.LiveDrawing(client) as one, live.LiveDrawing(client) as two:
        counts = [(one.send(points).strokes, two.send(points).strokes) for points in drawing]
    assert counts == [(n, n) for n in range(1, len(drawing) + 1)]


def test_head_less_live_pad_draws_the_scripted_digit(client, capsys) -> None:
    shown = draw.live_drawing_pad(client, interactive=False)
    assert isinstance(shown, Figure) and len(shown.axes) == len(live.SCRIPTED_STROKES)
    assert "head-less" in capsys.readouterr().out


def test_interactive_live_pad_answers_every_stroke(client) -> None:
    """What the browser does at each pen lift: set the canvas's ``stroke``."""
    pytest.importorskip("anywidget")
    pad = draw.live_drawing_pad(client, interactive=True)
    canvas, (status, listing, _) = pad.children[0], pad.children[1].children
    for n, points in enumerate(live.scripted_drawing(), start=1):
        canvas.stroke = {"n": n, "points": points}
        assert listing.value.count("<li") == n, status.value
    assert "TorchServe says" in status.value
    canvas.stroke = {"n": 99, "clear": True}
    assert listing.value == "" and "Cleared" in status.value
    assert client.describe(LIVE_MODEL_NAME)[0]["batchSize"] == LIVE_BATCH_SIZE
