"""Shared fixtures: one small real model, one real .mar, real TorchServe servers.

Weights, archives and run directories live under pytest's temporary directories, never in
build/ or model_store/ (``train`` itself keeps its normalised-MNIST cache under data/MNIST).
Every TorchServe this session starts is recorded by the id of its process group, and the
session fails if any of its processes is still alive at the end.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import astuple
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from PIL import Image

from digitserve import archive, data, oip, train
from digitserve.config import Ports
from digitserve.server import (
    ModelSpec,
    ServerSettings,
    TorchServe,
    port_is_free,
    start_on_free_ports,
)

#: Command-line fragments of TorchServe's Java frontend and of its Python model workers, and of
#: KServe's ModelServer process.
SERVER_MARKERS = ("org.pytorch.serve.ModelServer", "model_service_worker",
                  "digitserve.kserve_server")

#: Process-group ids (the leader's pid) of every TorchServe this session started.
_STARTED_GROUPS: set[int] = set()
#: The marker processes seen in those groups while they ran (psutil.Process remembers the
#: creation time, so a recycled pid is not mistaken for one of ours).
_SEEN_PROCESSES: dict[int, psutil.Process] = {}
#: The state (process groups, temp dir) of every Ray cluster this session started.
_CLUSTERS: list[dict] = []


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Run the fast unit tests first, so ``-x`` stops before any server is started; a unit test
    that asks for MNIST is a mistake (``make test-unit`` runs without ``data/``)."""
    for item in items:
        if item.get_closest_marker("unit") and "mnist" in getattr(item, "fixturenames", ()):
            raise pytest.UsageError(f"{item.nodeid} is marked unit but needs MNIST (the mnist "
                                    "fixture): mark it integration")
    items.sort(key=lambda item: 0 if item.get_closest_marker("unit") else 1)


def server_processes(pgid: int) -> list[psutil.Process]:
    """Live (non-zombie) TorchServe frontend or worker processes in process group ``pgid``."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        try:
            if os.getpgid(proc.pid) != pgid or proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
        except (ProcessLookupError, psutil.Error):
            continue
        cmdline = " ".join(proc.info["cmdline"] or ())
        if any(marker in cmdline for marker in SERVER_MARKERS):
            found.append(proc)
    return found


def record_server_group(pgid: int) -> None:
    """Remember a TorchServe process group started by this session, and its processes now."""
    _STARTED_GROUPS.add(pgid)
    for proc in server_processes(pgid):
        _SEEN_PROCESSES[proc.pid] = proc


def record_cluster(state: dict) -> None:
    """Remember a Ray cluster started by this session (``cluster.status`` or its state file)."""
    _CLUSTERS.append(state)


def _leftovers() -> list[psutil.Process]:
    from digitserve import cluster

    left = {proc.pid: proc for pgid in _STARTED_GROUPS for proc in server_processes(pgid)}
    for state in _CLUSTERS:
        left.update({proc.pid: proc for proc in cluster.cluster_processes(state)})
    for pid, proc in _SEEN_PROCESSES.items():
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                left[pid] = proc
        except psutil.Error:
            continue
    return list(left.values())


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the session when a TorchServe process it started outlived it (then end those)."""
    deadline = time.monotonic() + 15
    left = _leftovers()
    while left and time.monotonic() < deadline:  # a stop may still be winding down
        time.sleep(0.5)
        left = _leftovers()
    if not left:
        return
    lines = []
    for proc in left:
        try:
            lines.append(f"  pid {proc.pid}: {' '.join(proc.cmdline())[:160]}")
        except psutil.Error:
            lines.append(f"  pid {proc.pid}")
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    message = "\nServer processes started by this test session are still running:\n"
    if reporter:
        reporter.write_line(message + "\n".join(lines), red=True)
    for pgid in _STARTED_GROUPS:  # clean up only the groups this session started
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for proc in left:  # and what is left of its clusters
        try:
            proc.kill()
        except psutil.Error:
            pass
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
def server_group_recorder():
    """The function tests call with the process-group id of a server they start themselves."""
    return record_server_group


@pytest.fixture(scope="session")
def seven() -> np.ndarray:
    """MNIST test image 0 (a 7), shipped in tests/data so that the unit tier needs no download;
    ``test_preprocessing_mnist`` checks it against the real file."""
    return np.asarray(Image.open(Path(__file__).parent / "data" / "mnist_test_0.png"))


@pytest.fixture(scope="session")
def mnist() -> Path:
    """Real MNIST under data/, fetched (and verified) once, for the tests that ask for it."""
    return data.ensure_mnist()


@pytest.fixture(scope="session")
def mnist_test(mnist: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The real MNIST test set: uint8 images (10000, 28, 28) and labels."""
    return data.load_split(train=False)


@pytest.fixture(scope="session")
def trained_weights(mnist: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small real DigitCNN trained once per session (1 epoch on 6,000 images).

    ``digitcnn.metrics.json`` beside the weights holds what ``train`` reported.
    """
    out = tmp_path_factory.mktemp("weights")
    weights = out / "digitcnn.pt"
    metrics = train.train(
        train.TrainSettings(epochs=1, train_limit=6000, batch_size=128),
        weights_path=weights,
        metrics_path=out / "digitcnn.metrics.json",
    )
    assert weights.is_file(), metrics
    return weights


@pytest.fixture(scope="session")
def model_store(trained_weights: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model store holding ``digit-model.mar`` built from the session's weights."""
    store = tmp_path_factory.mktemp("model_store")
    mar = archive.build_archive(trained_weights, model_store=store)
    assert mar.is_file()
    return store


def _start_server(run_dir: Path, store: Path, spec: ModelSpec, **settings) -> TorchServe:
    # On free ports, again on others if one is taken before TorchServe binds it; on failure
    # it has already stopped what it started.
    server = start_on_free_ports(ServerSettings(run_dir=run_dir, model_store=store,
                                                models=(spec,), **settings))
    record_server_group(server.process.pid)
    return server


@pytest.fixture(scope="session")
def server(model_store: Path, tmp_path_factory: pytest.TempPathFactory):
    """A real TorchServe serving the session's model, one request per batch."""
    ts = _start_server(tmp_path_factory.mktemp("run"), model_store, ModelSpec(batch_size=1))
    yield ts
    ts.stop()


@pytest.fixture(scope="module")
def oip_server(model_store: Path, tmp_path_factory: pytest.TempPathFactory):
    """A TorchServe that also speaks the Open Inference Protocol (under its own service name)."""
    ts = _start_server(tmp_path_factory.mktemp("run_oip"), model_store, ModelSpec(),
                       extra_properties=oip.OIP_PROPERTIES)
    yield ts
    ts.stop()


@pytest.fixture(scope="session")
def batching_server(model_store: Path, tmp_path_factory: pytest.TempPathFactory):
    """A second TorchServe that batches up to 8 requests arriving within 50 ms."""
    ts = _start_server(
        tmp_path_factory.mktemp("run_batching"),
        model_store,
        ModelSpec(batch_size=8, max_batch_delay_ms=50),
    )
    yield ts
    ts.stop()


# -- notebooks run by the tests (test_notebooks.py, test_workshop.py) -------------------------
def isolate_kit(root: Path, model_store: Path, port_offsets: range) -> pytest.MonkeyPatch:
    """Point the kit's build folder, model store, run directory and ports away from the user's.

    Set in this process's environment before papermill starts a kernel: the kernel inherits it
    and ``digitserve.config`` reads it when the kernel imports the package. Undo the returned
    patch when done.
    """
    offset = next((offset for offset in port_offsets
                   if all(port_is_free(port + offset) for port in astuple(Ports()))), None)
    if offset is None:
        pytest.fail(f"no port offset in {port_offsets} leaves TorchServe's five ports free")
    patch = pytest.MonkeyPatch()
    patch.setenv("DIGITSERVE_BUILD_DIR", str(root / "build"))
    patch.setenv("DIGITSERVE_MODEL_STORE", str(model_store))
    patch.setenv("DIGITSERVE_RUN_DIR", str(root / "run"))
    patch.setenv("DIGITSERVE_PORT_OFFSET", str(offset))
    return patch


def run_dir_processes(run_dir: str) -> list[str]:
    """Live processes of a TorchServe started from ``run_dir``, as ``pid: command`` lines.

    The launcher and Java name the run directory's config file on their command line; the
    Python workers do not, but they inherit the private ``TMPDIR`` the kit gives each server.
    """
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "environ"]):
        cmdline = proc.info["cmdline"] or []
        tmpdir = (proc.info["environ"] or {}).get("TMPDIR", "")
        if tmpdir.startswith(run_dir) or any(run_dir in part for part in cmdline):
            found.append(f"{proc.info['pid']}: {' '.join(cmdline)[:120]}")
    return found


def assert_no_server_left(run_dir: str | None = None, grace_s: float = 15) -> None:
    """No process may still belong to ``run_dir`` (default: the isolated kit's) once a stop
    has had time to end."""
    run_dir = run_dir or os.environ["DIGITSERVE_RUN_DIR"]
    deadline = time.monotonic() + grace_s
    while (left := run_dir_processes(run_dir)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, "TorchServe processes outlived the notebook:\n" + "\n".join(left)
