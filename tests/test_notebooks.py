"""The lesson notebooks: committed clean, and each one runs at QUICK=True and records its figures.

The notebook runs write into temporary folders (build, model store, run directory) and use
shifted ports, so they never touch a user's artifacts or a server the user has running.
"""

from __future__ import annotations

import ast
import os
import sys
import time
from pathlib import Path

import nbformat
import papermill
import pytest
from conftest import assert_no_server_left, isolate_kit

from digitserve import archive, config, notebooks, progress, train
from digitserve.config import ARCHIVE_NAME

#: Every notebook in the folder, lessons or not: none may be committed with outputs.
NOTEBOOK_PATHS = sorted(notebooks.NOTEBOOKS_DIR.glob("*.ipynb"))
#: Port offsets tried for the test server: multiples of 100 from 1,000 up.
PORT_OFFSETS = range(1000, 20000, 100)
#: A notebook cell may take this long at QUICK=True before the run fails; a whole notebook twice.
CELL_TIMEOUT_S = 900
NOTEBOOK_TIMEOUT_S = 2 * CELL_TIMEOUT_S


# -- the committed files ------------------------------------------------------------------------
@pytest.mark.unit
@pytest.mark.parametrize("path", NOTEBOOK_PATHS, ids=lambda path: path.name)
def test_notebook_is_committed_clean(path: Path) -> None:
    """No outputs, no execution counts, the kit's kernel, one literals-only parameters cell."""
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata["kernelspec"]["name"] == notebooks.KERNEL_NAME
    code_cells = [cell for cell in nb.cells if cell.cell_type == "code"]
    for cell in code_cells:
        assert cell.outputs == [], f"{path.name} has outputs: run `nbstripout {path}`"
        assert cell.execution_count is None, f"{path.name} has execution counts"
    tagged = [cell for cell in nb.cells if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{path.name} needs exactly one cell tagged 'parameters'"
    assert tagged[0].cell_type == "code"
    values = {}
    for statement in ast.parse(tagged[0].source).body:
        assert isinstance(statement, ast.Assign) and len(statement.targets) == 1, (
            f"{path.name}: the parameters cell holds only `NAME = literal` lines"
        )
        target = statement.targets[0]
        assert isinstance(target, ast.Name) and target.id.isupper(), ast.unparse(statement)
        values[target.id] = ast.literal_eval(statement.value)  # raises on a non-literal
    assert list(values)[0] == "QUICK" and values["QUICK"] is False, (
        f"{path.name}: the parameters cell starts with QUICK = False"
    )


# -- running them -------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def isolated_kit(mnist: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Point every artifact and port of the kit elsewhere; return the temporary build folder."""
    root = tmp_path_factory.mktemp("kit")
    patch = isolate_kit(root, root / "model_store", PORT_OFFSETS)
    yield root / "build"
    patch.undo()


def provide_inputs(name: str, build: Path) -> None:
    """Make, with the package at the quick setting, what the lessons before ``name`` make,
    when they have not run: so that one lesson's test runs alone (``make test-notebooks K=04``).

    In a whole run the earlier notebooks have made them, and nothing is done here.
    """
    index = notebooks.NOTEBOOKS.index(name)
    weights = build / "artifacts" / config.WEIGHTS_PATH.name
    if index > 0 and not weights.is_file():
        train.train(train.QUICK, weights_path=weights,
                    metrics_path=weights.with_name(config.TRAIN_METRICS_PATH.name))
    weights_v2 = build / "artifacts" / config.WEIGHTS_V2_PATH.name
    if name == "06_versions_and_workers.ipynb" and not weights_v2.is_file():
        train.train_version2(weights_path=weights_v2)
    store = Path(os.environ["DIGITSERVE_MODEL_STORE"])
    if index > 1 and not (store / config.ARCHIVE_PATH.name).is_file():
        archive.build_archive(weights, model_store=store)


def check_01_train(metrics: dict) -> None:
    assert metrics["test_accuracy"] >= 0.95, metrics["test_accuracy"]
    # The saved weights, reloaded, answer what training measured with the weights in memory.
    assert abs(metrics["test_accuracy"] - metrics["train_reported_test_accuracy"]) < 1e-3
    assert metrics["epochs"] == train.QUICK.epochs
    assert metrics["train_images"] == train.QUICK.train_limit
    # Version 2.0, trained here for notebook 06.
    assert Path(metrics["v2_weights"]).is_file()
    assert metrics["v2_test_accuracy"] >= 0.9, metrics["v2_test_accuracy"]
    # No progress-bar flood: text bars refresh on their clock, not once per batch (the quick
    # training has 157 batches per version).
    executed = Path(metrics["weights"]).parents[1] / "notebooks" / "01_train.ipynb"
    text = "".join(output.get("text", "") for cell in nbformat.read(executed, 4).cells
                   for output in cell.get("outputs", []))
    refreshes = text.count("\r") + text.count("\n")
    clock_ticks = 2 * metrics["wall_time_s"] / progress.HEADLESS_INTERVAL_S
    assert refreshes < clock_ticks + 100, f"{refreshes} output lines in {executed}"


def check_02_archive(metrics: dict) -> None:
    assert Path(metrics["mar"]).is_file()
    assert {"model.py", "handler.py", "preprocessing.py"} <= set(metrics["files"])
    assert metrics["model_name"] == "digitmodel"


def check_03_serve(metrics: dict) -> None:
    assert metrics["health"] == "Healthy"
    assert metrics["stopped"] is True
    assert_no_server_left()


def check_04_grpc_client(metrics: dict) -> None:
    wrong = [p for p in metrics["predictions"] if p["digit"] != p["true"]]
    assert metrics["n_samples"] == 20 and not wrong, f"wrong predictions: {wrong}"
    assert metrics["all_correct"] is True
    assert "not an image" in metrics["bad_input_error"]
    assert metrics["stopped"] is True
    assert_no_server_left()


def check_05_robust_serving(metrics: dict) -> None:
    for name, answer in metrics["real_world"].items():
        assert answer["predicted"] == answer["true"], (name, answer)
    statuses = {row["input"]: row["status"] for row in metrics["bad_inputs"]}
    assert set(statuses.values()) == {"INVALID_ARGUMENT"}, statuses
    longest = metrics["limits"]["max_message_chars"]
    assert all(0 < len(row["message"]) <= longest for row in metrics["bad_inputs"])
    assert metrics["stream_messages"] == 1
    assert metrics["stream_key_digit"] == metrics["next_call_digit"] == metrics["with_token_digit"]
    assert metrics["worker_pids"]["before"] == metrics["worker_pids"]["after"]
    assert metrics["no_token_status"] == "PERMISSION_DENIED"
    assert metrics["errors"] == 0 and metrics["same_digits"] is True
    assert metrics["largest_probability_gap"] < 1e-3
    assert min(metrics["images_per_s"].values()) > 0
    assert_no_server_left()


def check_06_versions_and_workers(metrics: dict) -> None:
    assert metrics["v2_settings"]["augment"] is True
    assert metrics["v2_settings"]["train_limit"] == train.VERSION2.train_limit
    assert metrics["n_compared"] == 200
    assert set(metrics["versions_compared"]) == {"1.0", "2.0"}
    assert min(metrics["versions_compared"].values()) >= 0.9, metrics["versions_compared"]
    assert metrics["batch_sizes"] == {"1.0": 1, "2.0": 16}
    assert set(metrics["rates_by_version"]) == {"1.0", "2.0"}
    assert metrics["unregister_default"] == "UNKNOWN"
    assert metrics["default_after"] == "2.0"
    assert metrics["served_after_unregister"] == ["2.0"]
    assert metrics["workers_scaled"] == [2, 1]
    assert set(metrics["rates_by_workers"]) == {"1", "2"}
    assert metrics["n_evaluated"] == 500 and metrics["errors"] == 0
    assert metrics["accuracy_grpc"] >= 0.9
    assert metrics["agreement"] == 1.0
    assert metrics["largest_probability_gap"] < 1e-3
    assert metrics["stopped"] is True
    assert_no_server_left()


def check_07_streaming_and_oip(metrics: dict) -> None:
    """Streaming answered, the live drawing answered every stroke as REST answered the whole
    canvas, with fewer bytes; the Open Inference Protocol answered under TorchServe's own name.

    No timing is asserted: the times per update are recorded, whichever API was faster.
    """
    assert metrics["stream_stages"][-1] == "final" and metrics["stream_final_equals_unary"]
    assert "sequenceId is required" in metrics["no_sequence_id"]
    live = metrics["live_drawing"]
    assert live["strokes"] >= 5 and len(live["answers"]) == live["strokes"]
    assert all(answer["same_as_rest"] for answer in live["answers"]), live["answers"]
    assert metrics["live_connections"] == {"grpc": 1, "rest": 1}
    assert live["bytes_grpc"] < live["bytes_rest"]
    assert all(stroke < png for stroke, png in zip(metrics["live_stroke_bytes"],
                                                   metrics["live_png_bytes"], strict=True))
    assert live["ms_per_update_grpc"] > 0 and live["ms_per_update_rest"] > 0
    assert metrics["oip_same_as_grpc"] is True
    assert metrics["oip_metadata"]["name"] == "digitmodel"
    assert metrics["standard_oip_name"] == "UNIMPLEMENTED"
    assert metrics["stopped"] is True
    assert_no_server_left()


def check_08_why_grpc(metrics: dict) -> None:
    """why_grpc.json holds every situation with its verdict, every file was written, every
    measured call answered right; the live drawing is there once its model is in the kit.

    No timing is asserted: the verdicts are whatever this run measured.
    """
    import importlib.util
    import json

    for name, path in metrics["files"].items():
        assert Path(path).is_file() and Path(path).stat().st_size > 0, name
    assert metrics["settings_quick"] is True
    why = json.loads(Path(metrics["files"]["why_grpc"]).read_text())
    keys = {"id", "situation", "measure", "unit", "grpc", "rest", "better", "ratio"}
    assert all(set(row) == keys for row in why["situations"])
    assert {row["better"] for row in why["situations"]} <= {"grpc", "rest", "tie"}
    assert set(metrics["situation_ids"]) == {
        "connection_reuse_plaintext", "connection_reuse_tls", "new_connection_both_plaintext",
        "new_connection_both_tls", "rest_as_good", "many_callers_64", "deadlines", "payload",
        "encoding"}
    assert metrics["errors"] == 0 and metrics["mismatches"] == 0
    assert metrics["breakdown_modes"] == ["grpc", "rest"]
    assert {"HEADERS", "DATA"} <= set(metrics["wire_grpc_frames"])
    assert metrics["wire_rest_first_line"].startswith("POST /predictions/")
    assert metrics["deadline_outcomes"] == {"grpc": ["DEADLINE_EXCEEDED"],
                                            "rest": ["client timeout"]}
    assert metrics["n_takeaways"] >= 3
    if importlib.util.find_spec("digitserve.live") is not None:
        live = why["live_drawing"]
        assert set(live) == {"strokes", "answers", "bytes_grpc", "bytes_rest",
                             "ms_per_update_grpc", "ms_per_update_rest"}
        assert live["strokes"] >= 5 and len(live["answers"]) == live["strokes"]
    assert_no_server_left()


def check_09_beyond_one_machine(metrics: dict) -> None:
    """Both OIP servers agree, the cluster ran on two nodes and lost no call, nothing is left."""
    from digitserve import cluster

    assert metrics["oip_services"] == {
        "torchserve": "org.pytorch.serve.grpc.openinference.GRPCInferenceService",
        "kserve": "inference.GRPCInferenceService"}
    assert metrics["oip_same_digits"] is True
    assert metrics["oip_largest_probability_gap"] < 1e-5
    assert metrics["kserve_reference_agrees"] is True
    assert {address.rsplit(":", 1)[0] for address in metrics["kserve_listening"]} <= {
        "127.0.0.1", "::ffff:127.0.0.1"}
    assert metrics["kserve_stopped"] is True
    assert sorted(metrics["cluster_nodes"]) == sorted(cluster.NODE_NAMES)
    assert sorted(metrics["cluster_replica_nodes"]) == sorted(cluster.NODE_NAMES)
    assert metrics["cluster_health"] == "Healthy"
    assert metrics["cluster_same_as_torchserve"] is True
    assert metrics["no_key_status"] == "PERMISSION_DENIED"
    killed = metrics["killed"]
    assert killed["failures"] == [] and killed["wrong"] == 0, killed
    assert killed["answered"] == killed["calls"] and killed["callers"] == 16
    assert killed["replaced_after_s"] is not None
    assert metrics["cluster_stopped"] is True and metrics["left_behind"] == 0
    assert cluster.cluster_processes(metrics["cluster_state"]) == []
    figures = metrics["side_by_side"]
    for server in ("torchserve", "cluster"):
        measured = figures[server]
        assert measured["errors"] == 0 and measured["mismatches"] == 0, (server, measured)
        for key in ("p50_ms_one_caller", "throughput_rps_16", "cold_start_s", "rss_mb"):
            assert measured[key] > 0, (server, key)
    assert sorted(figures["cluster"]["replica_nodes"]) == sorted(cluster.NODE_NAMES)
    assert "estimate" in figures["estimate"]["label"] and figures["estimate"]["rows"]
    assert_no_server_left()


CHECKS = {
    "01_train": check_01_train,
    "02_archive": check_02_archive,
    "03_serve": check_03_serve,
    "04_grpc_client": check_04_grpc_client,
    "05_robust_serving": check_05_robust_serving,
    "06_versions_and_workers": check_06_versions_and_workers,
    "07_streaming_and_oip": check_07_streaming_and_oip,
    "08_why_grpc": check_08_why_grpc,
    "09_beyond_one_machine": check_09_beyond_one_machine,
}
#: The first notebook whose run failed: the ones after it are skipped, not failed again.
_failed: list[str] = []


@pytest.mark.notebook
@pytest.mark.timeout(NOTEBOOK_TIMEOUT_S)
@pytest.mark.parametrize("name", notebooks.NOTEBOOKS)
def test_notebook_runs_quick(name: str, isolated_kit: Path) -> None:
    """Run one lesson at QUICK=True (in order: each uses what the one before made)."""
    if _failed:
        pytest.skip(f"{_failed[0]} failed, and {name} needs what it makes")
    _failed.append(name)
    provide_inputs(name, isolated_kit)
    started = time.time()
    executed = notebooks.run_notebook(name, quick=True, out_dir=isolated_kit / "notebooks",
                                      timeout_s=CELL_TIMEOUT_S)
    assert executed.is_file()
    stem = Path(name).stem
    metrics_file = isolated_kit / "metrics" / f"{stem}.json"
    assert metrics_file.is_file(), f"{name} ran but wrote no {metrics_file}"
    assert metrics_file.stat().st_mtime >= started, f"{metrics_file} is stale"
    metrics = notebooks.read_metrics(stem, metrics_dir=isolated_kit / "metrics")
    assert metrics["recorded_at"] >= started
    assert metrics["quick"] is True
    assert Path(metrics["python"]).is_relative_to(sys.prefix), (
        f"{name} ran on {metrics['python']}, not on this environment's Python ({sys.prefix})"
    )
    CHECKS[stem](metrics)
    _failed.remove(name)


@pytest.mark.notebook
@pytest.mark.parametrize(("name", "first"), [
    ("02_archive.ipynb", "01_train.ipynb"),
    ("03_serve.ipynb", "02_archive.ipynb"),
    ("04_grpc_client.ipynb", "02_archive.ipynb"),
    ("05_robust_serving.ipynb", "02_archive.ipynb"),
    ("06_versions_and_workers.ipynb", "02_archive.ipynb"),
    ("07_streaming_and_oip.ipynb", "02_archive.ipynb"),
    ("08_why_grpc.ipynb", "02_archive.ipynb"),
    ("09_beyond_one_machine.ipynb", "02_archive.ipynb"),
])
def test_notebook_names_what_to_run_first(
    name: str, first: str, isolated_kit: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Run alone with nothing built, a lesson fails saying which notebook makes its input."""
    monkeypatch.setenv("DIGITSERVE_BUILD_DIR", str(tmp_path / "build"))
    monkeypatch.setenv("DIGITSERVE_MODEL_STORE", str(tmp_path / "model_store"))
    with pytest.raises(notebooks.NotebookError, match=f"run notebooks/{first}"):
        notebooks.run_notebook(name, quick=True, out_dir=tmp_path / "notebooks", timeout_s=120)


@pytest.mark.notebook
def test_failed_notebook_still_stops_its_server(
    isolated_kit: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cell fails while TorchServe runs: the kernel's exit (``atexit``) still stops it."""
    monkeypatch.setenv("JUPYTER_PREFER_ENV_PATH", "1")
    if not (Path(os.environ["DIGITSERVE_MODEL_STORE"]) / f"{ARCHIVE_NAME}.mar").is_file():
        pytest.skip("needs the archive notebook 02 makes: run the whole module")
    nb = nbformat.read(notebooks.NOTEBOOKS_DIR / "04_grpc_client.ipynb", as_version=4)
    start = next(i for i, cell in enumerate(nb.cells)
                 if cell.cell_type == "code" and ".start(" in cell.source)
    nb.cells.insert(start + 1, nbformat.v4.new_code_cell("raise RuntimeError('a cell failed')"))
    failing = tmp_path / "04_failing.ipynb"
    nbformat.write(nb, failing)
    with pytest.raises(papermill.PapermillExecutionError, match="a cell failed"):
        papermill.execute_notebook(
            str(failing), str(tmp_path / "executed.ipynb"), parameters={"QUICK": True},
            kernel_name=notebooks.KERNEL_NAME, execution_timeout=CELL_TIMEOUT_S,
            cwd=str(notebooks.NOTEBOOKS_DIR), progress_bar=False,
        )
    assert_no_server_left()
