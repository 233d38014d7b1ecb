"""Unit tests of the server's lifecycle pieces: run record, environment, ports, keys, CLI.

In-process and fast: no TorchServe, no MNIST. The same behaviours are checked against a real
TorchServe in test_adversarial_server.py.
"""

from __future__ import annotations

import http.server
import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import astuple
from pathlib import Path

import grpc
import psutil
import pytest

from digitserve import channel, cli, config, environment, errors, ports, runrecord
from digitserve.client import MAX_IMAGE_BYTES, read_image
from digitserve.config import HOST, Ports

pytestmark = pytest.mark.unit


def record_for(process: psutil.Process, run_dir: Path) -> runrecord.RunRecord:
    return runrecord.for_process(process, ports.free_ports(), key_file=str(run_dir / "k.json"),
                                 log_file=str(run_dir / "log"))


# -- the run record -------------------------------------------------------------------------------
def test_run_record_is_written_atomically_private_and_read_back(tmp_path):
    record = record_for(psutil.Process(), tmp_path)
    path = runrecord.write(tmp_path, record)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == [runrecord.FILE_NAME]  # no temp file left
    assert runrecord.read(tmp_path) == record
    assert runrecord.owned_process(record) == (psutil.Process(), "running")
    assert runrecord.read(tmp_path / "nowhere") is None


@pytest.mark.parametrize("text", ['{"pid": 12', "", "[]", '{"pid": 1, "ports": {}}',
                                  '{"format": 2, "pid": "x"}'])
def test_an_unreadable_record_is_a_clear_error(tmp_path, text):
    runrecord.path(tmp_path).write_text(text)
    with pytest.raises(runrecord.RunRecordError, match="is unreadable"):
        runrecord.read(tmp_path)


def test_a_reused_pid_is_not_taken_for_the_recorded_server(tmp_path):
    """A record whose pid is now another program (a sleep in its own session), or another
    user's process (pid 1), is recognised as stale."""
    victim = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        mine = record_for(psutil.Process(), tmp_path)  # this test's python: create time, cmdline
        reused = runrecord.RunRecord(**{**mine.__dict__, "pid": victim.pid})
        process, why = runrecord.owned_process(reused)
        assert process is None and f"pid {victim.pid} is now another program (sleep 60)" == why
        assert runrecord.pid_reused(reused)
        init = runrecord.RunRecord(**{**mine.__dict__, "pid": 1})
        assert runrecord.owned_process(init)[0] is None and runrecord.pid_reused(init)
    finally:
        victim.kill()
        victim.wait()
    gone = runrecord.RunRecord(**{**mine.__dict__, "pid": victim.pid})
    assert runrecord.owned_process(gone) == (None, f"no process has pid {victim.pid} any more")
    assert not runrecord.pid_reused(gone)


def test_the_served_store_holds_links_to_mar_files_only(tmp_path):
    store, run_dir = tmp_path / "store", tmp_path / "run"
    (store / "unpacked").mkdir(parents=True)
    (store / "unpacked" / "handler.py").write_text("")
    (store / "a.mar").write_bytes(b"zip")
    (store / "notes.txt").write_text("")
    served = runrecord.link_archives(store, run_dir)
    assert sorted(p.name for p in served.iterdir()) == ["a.mar"]
    assert (served / "a.mar").resolve() == (store / "a.mar").resolve()
    (store / "b.mar").write_bytes(b"zip")  # archived after the start
    assert runrecord.link_archive(store, run_dir, "b.mar")
    assert not runrecord.link_archive(store, run_dir, "unpacked")
    assert not runrecord.link_archive(store, run_dir, "../store/a.mar")
    assert sorted(p.name for p in served.iterdir()) == ["a.mar", "b.mar"]


# -- the server's environment ---------------------------------------------------------------------
def test_variables_that_change_torchserve_are_dropped_with_a_reason():
    inherited = {"TS_CONFIG_FILE": "/x", "TS_DISABLE_TOKEN_AUTHORIZATION": "true",
                 "PYTHONPATH": "/mine", "JAVA_TOOL_OPTIONS": "-javaagent:x.jar",
                 "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1", "LOCAL_RANK": "1",
                 "HOME": "/home/me", "PATH": "/usr/bin", "OMP_WAIT_POLICY": "PASSIVE"}
    kept, dropped = environment.kit_environment(inherited)
    assert kept == {"HOME": "/home/me", "PATH": "/usr/bin", "OMP_WAIT_POLICY": "PASSIVE"}
    assert set(dropped) == set(inherited) - set(kept)
    assert "config.properties" in dropped["TS_CONFIG_FILE"]
    lines = environment.dropped_lines(dropped)
    assert len(lines) == len(dropped)
    assert all(line.startswith("left ") and "\n" not in line for line in lines)


# -- ports ---------------------------------------------------------------------------------------
def time_wait_port() -> int:
    """A port whose listener is closed and whose server side of a connection is in TIME_WAIT
    (the server closed first, as a killed TorchServe does). The listener sets SO_REUSEADDR as
    TorchServe's do; Linux lets a port in TIME_WAIT be bound again only when both sockets set
    it."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((HOST, 0))
    listener.listen()
    port = listener.getsockname()[1]
    client = socket.create_connection((HOST, port))
    accepted, _ = listener.accept()
    accepted.close()  # the server side closes first: it ends in TIME_WAIT
    time.sleep(0.05)
    client.close()
    listener.close()
    return port


def test_a_port_in_time_wait_is_free_and_a_listener_is_named():
    port = time_wait_port()
    with socket.socket() as plain:  # the old check: a bind without SO_REUSEADDR fails here
        with pytest.raises(OSError):
            plain.bind((HOST, port))
    assert ports.port_is_free(port)
    with socket.socket() as holder:
        holder.bind((HOST, 0))
        holder.listen()
        held = holder.getsockname()[1]
        assert not ports.port_is_free(held)
        assert ports.holder(held).startswith(f"pid {os.getpid()}: ")
        (busy,) = ports.busy_ports(Ports(held, *astuple(ports.free_ports())[1:]))
        assert busy.startswith(f"grpc_inference {held} (pid {os.getpid()}: ")


def test_free_ports_are_distinct_free_and_below_the_ephemeral_range():
    chosen = ports.free_ports()
    values = list(vars(chosen).values())
    assert len(set(values)) == 5
    assert all(port in ports.FREE_PORT_RANGE and ports.port_is_free(port) for port in values)


# -- channels and keys ---------------------------------------------------------------------------
def test_channel_options_bypass_proxies_and_never_retry_resource_exhausted():
    options = dict(channel.CHANNEL_OPTIONS)
    assert options["grpc.enable_http_proxy"] == 0
    service_config = json.loads(options["grpc.service_config"])
    (method_config,) = service_config["methodConfig"]
    assert method_config["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
    names = {(n["service"], n["method"]) for n in method_config["name"]}
    assert names == {("org.pytorch.serve.grpc.inference.InferenceAPIsService", "Predictions"),
                     ("org.pytorch.serve.grpc.openinference.GRPCInferenceService", "ModelInfer"),
                     ("inference.GRPCInferenceService", "ModelInfer")}
    assert service_config["retryThrottling"]["maxTokens"] > 0


def test_a_half_written_key_file_is_read_again(tmp_path):
    key_file = tmp_path / "key_file.json"
    whole = json.dumps({"inference": {"key": "abc"}})
    key_file.write_text(whole[:10])
    finisher = threading.Timer(0.2, key_file.write_text, args=(whole,))
    finisher.start()
    assert channel.read_key(key_file, "inference") == "abc"
    finisher.join()
    key_file.write_text("")
    with pytest.raises(errors.AuthError, match="stays unreadable"):
        channel.read_key(key_file, "inference", settle_s=0.1)


class TokenApi(http.server.BaseHTTPRequestHandler):
    """TorchServe's token renewal: POST /token?type=inference rewrites the key file."""

    key_file: Path
    renewals: list[str]

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        self.renewals.append(self.path)
        keys = json.loads(self.key_file.read_text())
        keys["inference"]["key"] = f"key-{len(self.renewals)}"
        time.sleep(0.05)
        self.key_file.write_text(json.dumps(keys))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_sixteen_callers_refused_at_once_renew_the_key_once(tmp_path, monkeypatch):
    key_file = tmp_path / "key_file.json"
    key_file.write_text(json.dumps({"inference": {"key": "old"}, "API": {"key": "api"}}))
    handler = type("Handler", (TokenApi,), {"key_file": key_file, "renewals": []})
    server = http.server.ThreadingHTTPServer((HOST, 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    # A proxy set for the internet must not see the loopback token API.
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
    try:
        keys = channel.Keys(key_file, f"http://{HOST}:{server.server_address[1]}")
        sent = keys.metadata("inference")
        start = threading.Barrier(16)

        def refused() -> bool:
            start.wait()
            return keys.renew("inference", sent)

        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(lambda _: refused(), range(16)))
        assert results == [True] * 16
        assert handler.renewals == ["/token?type=inference"]
        assert keys.metadata("inference") == (("authorization", "Bearer key-1"),)
    finally:
        server.shutdown()
        server.server_close()


# -- errors ---------------------------------------------------------------------------------------
class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


def explain(code: grpc.StatusCode, details: str, **kwargs) -> errors.ServingError:
    return errors.explain(FakeRpcError(code, details), target="digitmodel version 1.0",
                          deadline_s=kwargs.pop("deadline_s", 10.0), key_file="k", **kwargs)


def test_messages_name_the_deadline_used_and_a_full_queue_is_not_a_missing_model():
    assert "deadline of 120 s" in str(explain(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline",
                                              deadline_s=120.0))
    full = explain(grpc.StatusCode.INTERNAL, 'Model "digitmodel" Version 1.0" has no worker to '
                   "serve inference request. Please use scale workers API to add workers.")
    assert isinstance(full, errors.ServerBusyError) and full.code == "INTERNAL"
    assert "job_queue_size" in str(full)
    died = explain(grpc.StatusCode.INTERNAL, "Worker died.", attempts=2)
    assert isinstance(died, errors.WorkerDiedError) and "sent twice" in str(died)
    assert isinstance(explain(grpc.StatusCode.NOT_FOUND, "Model not found: x"),
                      errors.ModelNotFoundError)


# -- reading images, and the command line ------------------------------------------------------
def test_images_are_size_checked_before_reading(tmp_path):
    with pytest.raises(errors.InvalidInputError, match="is a directory"):
        read_image(tmp_path)
    with pytest.raises(errors.InvalidInputError, match="not a regular file"):
        read_image("/dev/zero")  # never read: it has no end
    big = tmp_path / "big.png"
    big.write_bytes(b"\0" * (MAX_IMAGE_BYTES + 1))
    with pytest.raises(errors.RequestTooLargeError):
        read_image(big)
    assert read_image(b"png") == b"png"


@pytest.fixture
def dead_run_dir(tmp_path, monkeypatch) -> Path:
    """A run record naming five ports where nothing listens."""
    monkeypatch.setattr(config, "RUN_DIR", tmp_path)
    record = record_for(psutil.Process(), tmp_path)
    runrecord.write(tmp_path, record)
    Path(record.key_file).write_text(json.dumps({api: {"key": "k"} for api in
                                                 ("inference", "management", "API")}))
    return tmp_path


@pytest.mark.parametrize(("argv", "status", "message"), [
    (["stream", "{dir}"], cli.EXIT_BAD_IMAGE, "is a directory"),
    (["stream", "/dev/zero"], cli.EXIT_BAD_IMAGE, "not a regular file"),
    (["predict", "{dir}/none.png"], cli.EXIT_BAD_IMAGE, "not found"),
    (["models"], cli.EXIT_UNREACHABLE, "Is it running?"),
    (["describe"], cli.EXIT_UNREACHABLE, "Is it running?"),
])
def test_cli_failures_are_one_line_and_a_distinct_status(dead_run_dir, capsys, argv, status,
                                                         message):
    argv = [arg.format(dir=dead_run_dir) for arg in argv]
    assert cli.main(argv) == status
    out, err = capsys.readouterr()
    text = out + err
    assert message in text and "Traceback" not in text
    assert len(err.strip().splitlines()) <= 1


def test_cli_without_a_server_and_on_an_unexpected_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(config, "RUN_DIR", tmp_path)
    assert cli.main(["predict", "x.png"]) == cli.EXIT_UNREACHABLE
    assert "no TorchServe was started" in capsys.readouterr().err

    def broken(args):
        raise KeyError("boom")

    monkeypatch.setattr(cli, "run_check", broken)
    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    parser._subparsers._group_actions[0].choices["check"].set_defaults(run=broken)
    assert cli.main(["check"]) == cli.EXIT_FAILED
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("digitserve check: unexpected KeyError")


def test_cli_help_documents_the_exit_statuses():
    result = subprocess.run([sys.executable, "-m", "digitserve.cli", "predict", "--help"],
                            capture_output=True, text=True, check=True, timeout=60)
    for status in ("3    TorchServe not running", "4    bad image"):
        assert status in result.stdout


def test_the_record_waits_for_the_started_program_s_command_line(tmp_path):
    """Popen returns before the kernel has set up the new program's arguments; the record is
    made from the program's own command line, never an empty or the parent's one."""
    for _ in range(20):
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)",
                                  "--marker"], start_new_session=True)
        try:
            record = runrecord.for_process(psutil.Process(child.pid), ports.free_ports(),
                                           expect="--marker", key_file="k", log_file="l")
            assert record.cmdline[-1] == "--marker"
            assert runrecord.owned_process(record)[0] is not None
        finally:
            child.kill()
            child.wait()


# -- where the worker sockets go --------------------------------------------------------------
def test_a_short_run_directory_keeps_its_sockets_inside(tmp_path):
    run_dir = tmp_path / "run"
    assert runrecord.temp_dir(run_dir) == run_dir / "tmp"


def test_a_deep_run_directory_gets_a_short_private_temp_folder(tmp_path):
    run_dir = tmp_path / ("d" * 90) / "run"
    folder = runrecord.temp_dir(run_dir)
    assert folder.parent == Path("/tmp") and run_dir not in folder.parents
    assert len(f"{folder}/.ts.sock.65535") <= runrecord.UNIX_SOCKET_PATH_MAX
    assert runrecord.temp_dir(run_dir) == folder  # the same for every process
    made = runrecord.make_temp_dir(run_dir)
    try:
        assert made == folder and stat.S_IMODE(folder.stat().st_mode) == 0o700
    finally:
        runrecord.remove(run_dir)
    assert not folder.exists()


def test_a_short_temp_folder_someone_else_made_is_refused(tmp_path):
    run_dir = tmp_path / ("e" * 90) / "run"
    folder = runrecord.temp_dir(run_dir)
    folder.symlink_to(tmp_path)
    try:
        with pytest.raises(runrecord.RunRecordError, match="not a folder of yours"):
            runrecord.make_temp_dir(run_dir)
    finally:
        folder.unlink()
