"""The workshop: lesson structure, the request-path diagram, the drawing pad, the exercises with
their solutions (executed at QUICK), and the HTML report.

``test_notebooks.py`` already checks that every notebook is committed without outputs and with
one literals-only parameters cell; this module does not repeat it.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import time
from dataclasses import astuple
from pathlib import Path

import nbformat
import numpy as np
import pytest
import torch
from conftest import assert_no_server_left, isolate_kit
from matplotlib.figure import Figure
from PIL import Image

from digitserve import diagram, draw, exercises, notebooks, preprocessing, progress, report
from digitserve.client import Prediction
from digitserve.config import Ports

ALL_NOTEBOOKS = notebooks.NOTEBOOKS + notebooks.EXTRA_NOTEBOOKS
#: Port offsets tried for the exercise servers (test_notebooks.py uses 1,000–20,000).
PORT_OFFSETS = range(21000, 40000, 100)
CELL_TIMEOUT_S = 900


def read(name: str) -> nbformat.NotebookNode:
    return nbformat.read(notebooks.NOTEBOOKS_DIR / name, as_version=4)


def markdown(nb: nbformat.NotebookNode) -> list[str]:
    return [cell.source for cell in nb.cells if cell.cell_type == "markdown"]


# -- what every notebook says -------------------------------------------------------------------
@pytest.mark.unit
@pytest.mark.parametrize("name", ALL_NOTEBOOKS)
def test_notebook_opens_with_goals_prerequisites_and_time(name: str) -> None:
    """The first cell says what you will learn, what must run first, and how long it takes."""
    first = read(name).cells[0]
    assert first.cell_type == "markdown" and first.source.startswith("# "), name
    for heading in ("**What you will", "**Before this notebook**", "**Time**"):
        assert heading in first.source, f"{name}'s first cell lacks {heading}"


@pytest.mark.unit
@pytest.mark.parametrize("name", ALL_NOTEBOOKS)
def test_notebook_ends_with_recap_and_next_step(name: str) -> None:
    """The last markdown cell is a recap that names the next step."""
    last = markdown(read(name))[-1]
    assert last.startswith("## Recap"), f"{name}: the last markdown cell is not a recap"
    assert "**Next**" in last, f"{name}: the recap does not say what comes next"


@pytest.mark.unit
def test_exercises_and_solutions_differ_only_in_the_solution_cells() -> None:
    """Same cells in the same order; each starter in exercises is a hidden solution in the other."""
    exercises, solutions = read("exercises.ipynb"), read("solutions.ipynb")
    assert len(exercises.cells) == len(solutions.cells)
    solved = 0
    for index, (task, answer) in enumerate(zip(exercises.cells, solutions.cells, strict=True)):
        if "solution" in answer.metadata.get("tags", []):
            solved += 1
            assert answer.metadata["jupyter"]["source_hidden"] is True, f"cell {index} is shown"
            assert task.cell_type == "code" and "solution" not in task.metadata.get("tags", [])
            assert task.source != answer.source
        elif index:  # the introductions differ: one explains the exercises, one the solutions
            renamed = task.source.replace('"exercises"', '"solutions"').replace(
                "exercises.json", "solutions.json")
            same = renamed == answer.source
            assert same, f"cell {index} differs (other than the notebook's name)"
    assert 3 <= solved <= 5


# -- the diagram and the drawing pad ------------------------------------------------------------
@pytest.mark.unit
def test_request_path_diagram_renders(tmp_path: Path) -> None:
    ports = Ports(*(port + 100 for port in astuple(Ports())))
    fig = diagram.request_path(ports, batch_size=8, max_batch_delay_ms=10,
                               save_to=tmp_path / "figures" / "path.png")
    assert isinstance(fig, Figure)
    texts = " ".join(text.get_text() for text in fig.axes[0].texts)
    for words in ("7170", "Java", "Python", "token", "batch", "protobuf", "softmax",
                  "up to 8 requests within 10 ms"):
        assert words in texts, words
    with Image.open(tmp_path / "figures" / "path.png") as png:
        assert png.width > 1000 and png.height > 400
        # Not blank: the boxes are coloured.
        assert len(np.unique(np.asarray(png.convert("RGB")).reshape(-1, 3), axis=0)) > 50


@pytest.mark.unit
def test_batching_follows_torchserves_rule() -> None:
    """Full batches leave at once; others when the window closes; queued requests join at once."""
    batches = diagram.simulate_batching([0, 1, 2, 3, 20, 50, 51], batch_size=4,
                                        max_batch_delay_ms=10, forward_ms=5, per_request_ms=0)
    assert [b.requests for b in batches] == [(0, 1, 2, 3), (4,), (5, 6)]
    assert [b.full for b in batches] == [True, False, False]
    assert batches[0].dispatched_ms == 3  # full when the 4th arrived, before the window closed
    assert batches[1].dispatched_ms == 30  # alone: it waited the whole window
    assert batches[2].opened_ms == 50 and batches[2].dispatched_ms == 60
    # Requests that queued while the worker was busy join the next batch at once.
    busy = diagram.simulate_batching([0, 1, 2], batch_size=2, max_batch_delay_ms=10,
                                     forward_ms=30, per_request_ms=0)
    assert busy[1].opened_ms == busy[0].done_ms and busy[1].requests == (2,)
    unbatched = diagram.simulate_batching([0, 1], batch_size=1, max_batch_delay_ms=10)
    assert [b.dispatched_ms for b in unbatched] == [0, unbatched[0].done_ms]


@pytest.mark.unit
def test_lesson_pictures_render(tmp_path: Path) -> None:
    figures = {
        "batching": diagram.batching_timeline(batch_size=8, max_batch_delay_ms=10),
        "default": diagram.default_pointer([("1.0", "a.mar"), ("2.0", "b.mar")], "1.0", "2.0"),
        "workers": diagram.workers_on_cores(save_to=tmp_path / "workers.png"),
    }
    texts = {name: " ".join(t.get_text() for ax in fig.axes for t in ax.texts + [ax.title])
             for name, fig in figures.items()}
    assert "dispatch 8" in texts["batching"] and "delay over" in texts["batching"]
    assert texts["default"].count("← default") == 2 and "SetDefault('2.0')" in texts["default"]
    assert "worker 2" in texts["workers"] and (tmp_path / "workers.png").stat().st_size > 10_000


@pytest.mark.unit
def test_headless_is_read_from_the_environment_at_each_call(monkeypatch) -> None:
    monkeypatch.setenv("DIGITSERVE_HEADLESS", "1")
    assert progress.headless()
    monkeypatch.delenv("DIGITSERVE_HEADLESS")
    assert not progress.headless()


@pytest.mark.unit
def test_exercise_checks_say_what_is_not_done(capsys) -> None:
    checks = exercises.Checks(FakeClient(), images=None, labels=None)
    assert checks.drawing(None, 2) is None and checks.description(None) is None
    checks.bad({})
    checks.confusions(None, None)
    checks.batching({}, images=10)
    printed = capsys.readouterr().out
    assert [f"Exercise {n} is not done yet" in printed for n in range(1, 6)] == [True] * 5
    assert checks.results()["most_confused"] is None and checks.results()["throughput"] == {}


@pytest.mark.unit
def test_exercise_4_check_finds_the_pair_really_mixed_up(capsys) -> None:
    """A wrong answer to exercise 4 is told so, with the right pair."""
    labels = torch.tensor([1, 7, 7, 4, 9, 3])
    served = [Prediction(digit, 0.9, [0.01] * 10, "1.0") for digit in (1, 1, 1, 9, 4, 3)]
    checks = exercises.Checks(FakeClient(), torch.zeros(6, 28, 28, dtype=torch.uint8), labels)
    checks.confusions(served, (4, 9, 2))
    assert "Check again" not in capsys.readouterr().out
    checks.confusions(served, (4, 9, 1))
    assert "Check again: the pair mixed up most is 1 and 7, 2 times" in capsys.readouterr().out
    assert checks.results()["confusion"][7][1] == 2 and checks.served_accuracy == 2 / 6


@pytest.mark.unit
def test_strokes_become_a_centred_mnist_digit() -> None:
    png = draw.png_from_strokes(draw.EXAMPLE_STROKES[7])
    with Image.open(io.BytesIO(png)) as image:
        assert image.format == "PNG" and image.size == (draw.CANVAS_PIXELS,) * 2
    digit = preprocessing.digit_from_payload(png)
    assert digit.shape == (28, 28) and digit.max() > 200  # light ink on black, as in MNIST
    rows, columns = np.nonzero(digit > 128)
    assert 10 <= rows.mean() <= 18 and 10 <= columns.mean() <= 18


class FakeClient:
    """Answers every image with the same digit: the pad's wiring, without a server."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def predict(self, image: bytes) -> Prediction:
        self.sent.append(image)
        probabilities = [0.01] * 10
        probabilities[7] = 0.91
        return Prediction(7, 0.91, probabilities, "1.0")


@pytest.mark.unit
def test_drawing_pad_headless_shows_a_digit_drawn_in_code(capsys) -> None:
    client = FakeClient()
    shown = draw.drawing_pad(client, interactive=False)
    assert isinstance(shown, Figure)
    assert "head-less" in capsys.readouterr().out
    assert len(client.sent) == 1 and client.sent[0].startswith(b"\x89PNG")


@pytest.mark.unit
def test_drawing_pad_is_headless_where_the_kit_runs_notebooks(monkeypatch, capsys) -> None:
    monkeypatch.setenv("DIGITSERVE_HEADLESS", "1")
    assert isinstance(draw.drawing_pad(FakeClient()), Figure)
    assert "head-less" in capsys.readouterr().out


@pytest.mark.unit
def test_drawing_pad_sends_each_drawing_and_shows_the_answer() -> None:
    """Setting the canvas's ``png`` (what the browser does at pen-up) makes one prediction."""
    pytest.importorskip("anywidget")
    client = FakeClient()
    pad = draw.drawing_pad(client, interactive=True)
    canvas, (status, answer) = pad.children[0], pad.children[1].children
    drawing = draw.png_from_strokes(draw.EXAMPLE_STROKES[7])
    canvas.png = "data:image/png;base64," + base64.b64encode(drawing).decode()
    assert client.sent == [drawing]
    assert "<b>7</b>" in status.value
    assert bytes(answer.value).startswith(b"\x89PNG")
    canvas.png = ""  # the Clear button
    assert answer.value == b"" and len(client.sent) == 1


@pytest.mark.unit
def test_head_less_runs_turn_the_drawing_pad_off() -> None:
    """Papermill gets INTERACTIVE = False for notebook 04, and no unknown parameter elsewhere."""
    def parameters(name: str) -> dict:
        return notebooks.notebook_parameters(notebooks.NOTEBOOKS_DIR / name, quick=True)

    assert parameters("04_grpc_client.ipynb") == {"QUICK": True, "INTERACTIVE": False}
    assert parameters("01_train.ipynb") == {"QUICK": True}


# -- the report ---------------------------------------------------------------------------------
def fake_executed(name: str, figure_png: bytes, error: bool = False) -> nbformat.NotebookNode:
    """The committed notebook with outputs as papermill would leave them (no kernel needed)."""
    nb = read(name)
    cell = next(cell for cell in nb.cells if cell.cell_type == "code")
    cell.outputs = [
        nbformat.v4.new_output("stream", name="stdout", text="hello from the kernel\n"),
        nbformat.v4.new_output("display_data", data={
            "image/png": base64.b64encode(figure_png).decode(), "text/plain": "<Figure>"}),
    ]
    if error:
        cell.outputs.append(nbformat.v4.new_output(
            "error", ename="ServerError", evalue="TorchServe did not start", traceback=[]))
    nb.metadata["papermill"] = {"duration": 12.5, "end_time": "2026-01-01T10:00:00",
                                "parameters": {"QUICK": True}, "exception": error}
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {}}}
    return nb


@pytest.mark.unit
def test_report_renders_executed_notebooks_with_embedded_figures(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    diagram.request_path().savefig(buffer, format="png", dpi=40)
    executed = tmp_path / "executed"
    executed.mkdir()
    failing = "05_robust_serving.ipynb"
    for name in ALL_NOTEBOOKS:
        nbformat.write(fake_executed(name, buffer.getvalue(), error=name == failing),
                       executed / name)
    index = report.build_report(quick=True, execute=False, executed_dir=executed,
                                out_dir=tmp_path / "report")
    assert index == tmp_path / "report" / "index.html"
    text = index.read_text()
    for name in ALL_NOTEBOOKS:
        page = tmp_path / "report" / f"{Path(name).stem}.html"
        assert f'href="{page.name}"' in text, f"index.html does not link {page.name}"
        body = page.read_text()
        assert 'src="data:image/png;base64,' in body, f"{page.name} has no embedded figure"
        assert "hello from the kernel" in body and 'href="index.html"' in body
        # Opens offline: no script, stylesheet or image fetched from anywhere.
        assert not re.search(r"<script[^>]+src=|(src|href)=\"(https?:)?//", body), page.name
    assert "data:image/png;base64," in text  # thumbnails
    assert "failed: ServerError: TorchServe did not start" in text
    assert f"{len(ALL_NOTEBOOKS) - 1} of {len(ALL_NOTEBOOKS)} notebooks ran" in text


@pytest.mark.unit
def test_report_without_solutions_leaves_them_out(tmp_path: Path) -> None:
    executed = tmp_path / "executed"
    executed.mkdir()
    nbformat.write(fake_executed("exercises.ipynb", b"\x89PNG"), executed / "exercises.ipynb")
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "solutions.html").write_text("left from an earlier report")
    index = report.build_report(execute=False, solutions=False, executed_dir=executed,
                                out_dir=tmp_path / "report")
    assert "solutions" not in index.read_text()
    assert not (tmp_path / "report" / "solutions.html").exists()
    assert "01_train.ipynb" in index.read_text()  # listed as not run


@pytest.mark.unit
def test_report_reuses_only_current_successful_runs(tmp_path: Path) -> None:
    """After `make demo`, `make report` renders its notebooks instead of running them again."""
    executed = tmp_path / "03_serve.ipynb"
    nbformat.write(fake_executed("03_serve.ipynb", b"\x89PNG"), executed)  # ran with QUICK
    assert report.is_current(executed, quick=True)
    assert not report.is_current(executed, quick=False)
    nbformat.write(fake_executed("03_serve.ipynb", b"\x89PNG", error=True), executed)
    assert not report.is_current(executed, quick=True)
    nbformat.write(fake_executed("03_serve.ipynb", b"\x89PNG"), executed)
    source = notebooks.NOTEBOOKS_DIR / "03_serve.ipynb"
    os.utime(executed, (source.stat().st_mtime - 60,) * 2)  # the lesson changed since
    assert not report.is_current(executed, quick=True)
    assert not report.is_current(tmp_path / "never_ran.ipynb", quick=True)


# -- the exercises, executed ------------------------------------------------------------------
@pytest.fixture(scope="module")
def workshop_kit(model_store: Path, tmp_path_factory: pytest.TempPathFactory):
    """The session's .mar, and a build folder, run directory and ports of the tests' own."""
    root = tmp_path_factory.mktemp("workshop")
    patch = isolate_kit(root, model_store, PORT_OFFSETS)
    yield root
    patch.undo()


def run_quick(name: str, root: Path) -> dict:
    started = time.time()
    notebooks.run_notebook(name, quick=True, out_dir=root / "build" / "notebooks",
                           timeout_s=CELL_TIMEOUT_S)
    metrics = notebooks.read_metrics(Path(name).stem, metrics_dir=root / "build" / "metrics")
    assert metrics["recorded_at"] >= started and metrics["quick"] is True
    assert metrics["stopped"] is True
    assert_no_server_left(str(root / "run"))
    return metrics


@pytest.mark.notebook
@pytest.mark.timeout(2 * CELL_TIMEOUT_S)
def test_exercises_run_as_handed_out(workshop_kit: Path) -> None:
    """Untouched, every exercise says it is not done yet, and the notebook still runs through."""
    metrics = run_quick("exercises.ipynb", workshop_kit)
    assert metrics["drawn"] is None and metrics["most_confused"] is None
    assert metrics["bad_requests"] == [] and metrics["throughput"] == {}
    executed = nbformat.read(workshop_kit / "build" / "notebooks" / "exercises.ipynb", 4)
    printed = "".join(output.get("text", "") for cell in executed.cells
                      for output in cell.get("outputs", []))
    assert printed.count("is not done yet") == 5, printed


@pytest.mark.notebook
@pytest.mark.timeout(2 * CELL_TIMEOUT_S)
def test_solutions_solve_every_exercise(workshop_kit: Path) -> None:
    metrics = run_quick("solutions.ipynb", workshop_kit)
    drawn = metrics["drawn"]
    # The answer shown is the likeliest digit of the ten probabilities the server sent.
    probabilities = drawn["probabilities"]
    assert drawn["intended"] == 2 and abs(sum(probabilities) - 1) < 1e-3
    assert drawn["predicted"] == probabilities.index(max(probabilities))
    assert drawn["probability"] == max(probabilities)
    assert "image" in json.dumps(metrics["handler_description"]["input"])
    codes = [row["code"] for row in metrics["bad_requests"]]
    assert codes == ["INVALID_ARGUMENT", "INVALID_ARGUMENT", "(not sent)"], metrics["bad_requests"]
    assert all(row["message"] for row in metrics["bad_requests"])
    # The solution names the pair the served answers really mix up most, with its count.
    first, second, count = metrics["most_confused"]
    mistakes = np.array(metrics["confusion"])
    pairs = mistakes + mistakes.T
    assert count == pairs.max(), (metrics["most_confused"], metrics["confusion"])
    assert count == 0 or (first < second and pairs[first, second] == count)
    assert metrics["failed_calls"] == 0 and metrics["served_accuracy"] >= 0.8
    assert set(metrics["throughput"]) == {"1", "8"} and min(metrics["throughput"].values()) > 0
    assert metrics["n_images"] == 200


@pytest.mark.unit
def test_the_demo_reports_each_notebooks_time_from_papermills_record(tmp_path):
    executed = []
    for name, seconds in (("01_train.ipynb", 90.0), ("02_archive.ipynb", 30.0)):
        path = tmp_path / name
        path.write_text(json.dumps({"metadata": {"papermill": {"duration": seconds}},
                                    "cells": []}))
        executed.append(path)
    assert notebooks.durations(executed) == {"01_train.ipynb": 90.0, "02_archive.ipynb": 30.0}
    table = notebooks.time_table(executed)
    assert "| `01_train.ipynb` | 1.5 min |" in table and "**2.0 min**" in table
