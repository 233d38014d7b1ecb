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

from digitserve import notebooks
from digitserve.config import ARCHIVE_NAME
from digitserve.train import QUICK_SETTINGS

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
def isolated_kit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Point every artifact and port of the kit elsewhere; return the temporary build folder."""
    root = tmp_path_factory.mktemp("kit")
    patch = isolate_kit(root, root / "model_store", PORT_OFFSETS)
    yield root / "build"
    patch.undo()


def check_01_train(metrics: dict) -> None:
    assert metrics["test_accuracy"] >= 0.95
    assert metrics["epochs"] == QUICK_SETTINGS.epochs
    assert metrics["train_images"] == QUICK_SETTINGS.train_limit
    assert metrics["wall_time_s"] > 0


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
    assert all(row["message"] for row in metrics["bad_inputs"])
    assert metrics["no_token_status"] == "PERMISSION_DENIED"
    assert metrics["errors"] == 0 and metrics["same_digits"] is True
    assert metrics["largest_probability_gap"] < 1e-3
    assert_no_server_left()


def check_06_grpc_api(metrics: dict) -> None:
    assert metrics["v2_settings"]["augment"] is True
    assert metrics["v2_settings"]["train_limit"] == QUICK_SETTINGS.train_limit
    assert metrics["n_compared"] == 200
    assert set(metrics["versions_compared"]) == {"1.0", "2.0"}
    assert min(metrics["versions_compared"].values()) >= 0.9, metrics["versions_compared"]
    assert metrics["unregister_default"] == "UNKNOWN"
    assert metrics["default_after"] == "2.0"
    assert metrics["served_after_unregister"] == ["2.0"]
    assert metrics["workers_scaled"] == [2, 1]
    assert metrics["n_evaluated"] == 500 and metrics["errors"] == 0
    assert metrics["accuracy_grpc"] >= 0.9
    assert metrics["agreement"] == 1.0
    assert metrics["largest_probability_gap"] < 1e-3
    assert metrics["stream_stages"] == ["top3", "final"]
    assert metrics["stream_final_equals_unary"] is True
    assert "sequenceId is required" in metrics["stream_bidirectional"]["(none)"]
    assert metrics["stream_bidirectional"]["session-1"].startswith("UNKNOWN")
    assert metrics["oip_same_as_grpc"] is True
    assert metrics["oip_metadata"]["versions"] == ["2.0"]
    assert metrics["stopped"] is True
    assert_no_server_left()


def check_07_benchmark(metrics: dict) -> None:
    """Every file written, every mode at every concurrency measured, every answer right.

    No timing is asserted: the targets are recorded with their values, met or not.
    """
    for name, path in metrics["files"].items():
        assert Path(path).is_file() and Path(path).stat().st_size > 0, name
    assert metrics["settings"]["quick"] is True
    assert metrics["modes"] == ["grpc", "grpc-stream", "in-process", "rest"]
    assert metrics["concurrencies"] == sorted(metrics["settings"]["concurrencies"])
    assert len(metrics["servers"]) == 2
    # The floor at batch 1 and 8 for each thread count, then 3 modes × callers × 2 servers.
    assert metrics["floor_threads"][0] == 1
    assert metrics["n_rows"] == (2 * len(metrics["floor_threads"])
                                 + 2 * 3 * len(metrics["settings"]["concurrencies"]))
    assert metrics["errors"] == 0 and metrics["mismatches"] == 0
    assert metrics["floor_p50_ms"] > 0 and metrics["floor_batch_throughput_rps"] > 0
    assert all(seconds > 0 for seconds in metrics["cold_start_s"])
    assert len(metrics["targets"]) == 4
    assert all(isinstance(t["met"], bool) for t in metrics["targets"].values())
    assert metrics["n_levers"] >= 6 and metrics["n_findings"] >= 5
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
    "06_grpc_api": check_06_grpc_api,
    "07_benchmark": check_07_benchmark,
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
    ("06_grpc_api.ipynb", "02_archive.ipynb"),
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
