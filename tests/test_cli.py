"""The ``digitserve`` console script, run as a learner runs it: a subprocess with its own env."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from PIL import Image

from digitserve import data, evaluate, preprocessing, protos
from digitserve.config import HOST, MODEL_NAME, MODEL_VERSION, STARTUP_TIMEOUT_S, Ports
from digitserve.server import port_is_free

pytestmark = pytest.mark.integration

DIGITSERVE = Path(sys.executable).with_name("digitserve")
PREDICTION_KEYS = {"image", "digit", "probability", "probabilities", "model_version"}
#: ``serve start`` waits up to config.STARTUP_TIMEOUT_S for the model; the rest is Python's and
#: Java's start-up on a busy machine.
CLI_START_TIMEOUT_S = STARTUP_TIMEOUT_S + 120


def digitserve(*args: str, env: dict[str, str], timeout: float = 120
               ) -> subprocess.CompletedProcess:
    """Run the console script; its output is captured, so a server it leaves running must not
    hold the pipes (``serve start`` returning at all checks that)."""
    return subprocess.run([str(DIGITSERVE), *args], env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


def free_port_offset() -> int:
    """An offset that moves all five default ports onto free ports below the ephemeral range."""
    rng = random.Random(os.getpid())
    for _ in range(200):
        offset = rng.randrange(10_000, 24_000)
        if all(port_is_free(port + offset) for port in vars(Ports()).values()):
            return offset
    raise RuntimeError("no free port offset found")


def group_members(pgid: int) -> list[psutil.Process]:
    members = []
    for proc in psutil.process_iter(["status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                members.append(proc)
        except (ProcessLookupError, psutil.Error):
            continue
    return members


@pytest.fixture(scope="module")
def base_env(tmp_path_factory) -> dict[str, str]:
    """The environment of a learner's shell with a private run directory; no server needed."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith("DIGITSERVE_")}
    env["DIGITSERVE_RUN_DIR"] = str(tmp_path_factory.mktemp("cli_run"))
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.fixture(scope="module")
def cli(base_env, model_store, server_group_recorder):
    """Environment for serving from the CLI: the session's model store, five free ports."""
    run_dir = Path(base_env["DIGITSERVE_RUN_DIR"])
    offset = free_port_offset()
    env = {**base_env, "DIGITSERVE_MODEL_STORE": str(model_store),
           "DIGITSERVE_PORT_OFFSET": str(offset)}

    def started() -> int:
        """Record the process group of the server ``serve start`` left running; return it."""
        pid = json.loads((run_dir / "server.json").read_text())["pid"]
        server_group_recorder(pid)
        return pid

    yield {"env": env, "run_dir": run_dir, "offset": offset, "started": started}
    state = run_dir / "server.json"
    if state.is_file():
        pid = json.loads(state.read_text())["pid"]
        digitserve("serve", "stop", env=env)
        if group_members(pid):
            os.killpg(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def samples(tmp_path_factory) -> list[Path]:
    return data.export_samples(per_digit=1, out=tmp_path_factory.mktemp("samples"))


@pytest.fixture(scope="module")
def expected_digits(samples, trained_weights) -> list[int]:
    """What the session's weights answer in-process for each sample PNG."""
    model = evaluate.load_model(trained_weights)
    digits = torch.from_numpy(np.stack([
        preprocessing.digit_from_payload(path.read_bytes()) for path in samples
    ]))
    return evaluate.predict_logits(model, digits).argmax(dim=1).tolist()


def status(cli) -> tuple[int, dict]:
    result = digitserve("serve", "status", "--json", env=cli["env"], timeout=60)
    return result.returncode, json.loads(result.stdout)


def start(cli) -> subprocess.CompletedProcess:
    result = digitserve("serve", "start", env=cli["env"], timeout=CLI_START_TIMEOUT_S)
    if (cli["run_dir"] / "server.json").is_file():
        cli["started"]()
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def check_predictions(cli, samples, expected_digits) -> None:
    result = digitserve("predict", *map(str, samples), env=cli["env"])
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(lines) == len(samples)
    for line, path, digit in zip(lines, samples, expected_digits, strict=True):
        assert set(line) == PREDICTION_KEYS
        assert line["image"] == str(path)
        assert line["digit"] == digit
        assert line["model_version"] == MODEL_VERSION
        assert abs(sum(line["probabilities"]) - 1) < 1e-3
    correct = sum(line["digit"] == data.label_of(path)
                  for line, path in zip(lines, samples, strict=True))
    assert correct >= 0.7 * len(samples), lines


# -- commands without a server ---------------------------------------------------------------
def test_check(base_env):
    result = digitserve("check", env=base_env)
    assert result.returncode == 0, result.stderr
    assert "nms runs" in result.stdout
    assert "Java" in result.stdout


def test_data_verifies_mnist_and_exports_samples(tmp_path, base_env, mnist_test):
    """`digitserve data` with DIGITSERVE_HOME elsewhere: the raw files are linked, not copied,
    and nothing is written into the checkout."""
    raw = data.raw_dir(tmp_path / "data")
    raw.mkdir(parents=True)
    for name in data.RAW_FILES:
        (raw / name).symlink_to(data.raw_dir() / name)
    env = {**base_env, "DIGITSERVE_HOME": str(tmp_path)}
    result = digitserve("data", "--per-digit", "2", env=env)
    assert result.returncode == 0, result.stderr
    written = sorted((tmp_path / "data" / "samples").glob("*.png"))
    assert len(written) == 20
    images, labels = mnist_test
    assert sorted(data.label_of(path) for path in written) == sorted(list(range(10)) * 2)
    for path in written:
        index = int(path.name[4:9])
        assert data.label_of(path) == int(labels[index])
        with Image.open(path) as image:
            assert np.array_equal(np.asarray(image), images[index].numpy())


def test_protos_check_passes_on_the_checkout(base_env):
    result = digitserve("protos", "--check", env=base_env)
    assert result.returncode == 0, result.stderr
    assert "up to date" in result.stdout


def test_protos_check_fails_on_a_changed_proto(tmp_path, base_env):
    shutil.copytree(protos.PROTOS_DIR, tmp_path / "protos")
    changed = tmp_path / "protos" / "inference.proto"
    changed.write_bytes(changed.read_bytes() + b"\n// edited by hand\n")
    result = digitserve("protos", "--check", env={**base_env, "DIGITSERVE_HOME": str(tmp_path)})
    assert result.returncode != 0
    assert "inference.proto" in result.stderr and "stale" in result.stderr


# -- serve start / status / predict / stop ---------------------------------------------------
def test_serve_lifecycle(cli, samples, expected_digits):
    code, report = status(cli)
    assert code != 0 and report["running"] is False
    plain = digitserve("serve", "status", env=cli["env"], timeout=60)
    assert plain.returncode != 0 and "no TorchServe was started" in plain.stdout

    result = start(cli)
    assert MODEL_NAME in result.stdout

    code, report = status(cli)
    assert code == 0 and report["running"] is True, report
    assert report["health"] == "Healthy"
    assert report["ports"]["grpc_inference"] == 7070 + cli["offset"]
    assert report["ports"]["grpc_management"] == 7071 + cli["offset"]
    assert report["host"] == HOST
    key_file = Path(report["key_file"])
    assert key_file.parent == cli["run_dir"] and key_file.is_file()
    assert {"inference", "management"} <= set(json.loads(key_file.read_text()))

    check_predictions(cli, samples, expected_digits)
    versioned = digitserve("predict", str(samples[0]), "--version", MODEL_VERSION, env=cli["env"])
    assert versioned.returncode == 0 and json.loads(versioned.stdout)["digit"] == expected_digits[0]

    again = digitserve("serve", "start", env=cli["env"], timeout=60)
    assert again.returncode != 0 and "already running" in again.stderr

    pid = report["pid"]
    stopped = digitserve("serve", "stop", env=cli["env"], timeout=120)
    assert stopped.returncode == 0 and "stopped" in stopped.stdout
    assert group_members(pid) == []
    code, report = status(cli)
    assert code != 0 and report["running"] is False
    assert not key_file.exists()


def test_predict_reports_bad_images_and_versions(cli, samples, tmp_path):
    start(cli)
    try:
        text = tmp_path / "notes.png"
        text.write_bytes(b"\x00\x01 these are not pixels")
        result = digitserve("predict", str(samples[0]), str(text), env=cli["env"])
        assert result.returncode != 0
        good, bad = (json.loads(line) for line in result.stdout.splitlines())
        assert set(good) == PREDICTION_KEYS
        assert bad["image"] == str(text) and "not an image" in bad["error"]
        wrong = digitserve("predict", str(samples[0]), "--version", "9.9", env=cli["env"])
        assert wrong.returncode != 0 and "9.9" in json.loads(wrong.stdout)["error"]
    finally:
        assert digitserve("serve", "stop", env=cli["env"], timeout=120).returncode == 0


def test_status_after_sigkill_is_stale_and_start_recovers(cli, samples, expected_digits):
    start(cli)
    code, report = status(cli)
    assert code == 0 and report["running"] is True
    pid = report["pid"]
    assert any("org.pytorch.serve.ModelServer" in " ".join(p.cmdline())
               for p in group_members(pid))

    os.killpg(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while group_members(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert group_members(pid) == []

    code, report = status(cli)
    assert code != 0 and report["running"] is False
    assert report["pid"] == pid and "stale" in report["message"]

    result = start(cli)
    assert (f"removed the stale run record of {cli['run_dir']} (no process has pid {pid} any "
            "more); nothing was signalled.") in result.stderr
    code, report = status(cli)
    assert code == 0 and report["running"] is True and report["pid"] != pid
    check_predictions(cli, samples[:3], expected_digits[:3])

    new_pid = report["pid"]
    assert digitserve("serve", "stop", env=cli["env"], timeout=120).returncode == 0
    assert group_members(new_pid) == []
    code, _ = status(cli)
    assert code != 0
