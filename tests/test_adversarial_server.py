"""Issue 12, the server's side: no inherited setting, stale record or retry can turn the kit's
TorchServe against its user. Every case against a real TorchServe over real gRPC.

The servers here serve an untrained DigitCNN (its answers do not matter, so no MNIST is needed)
or a test handler that kills its own worker on one input (``POISON``): a real request that
kills the worker serving it, so that retries can be counted by the times it was delivered.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
import zipfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import astuple
from pathlib import Path

import grpc
import numpy as np
import psutil
import pytest
import torch

from digitserve import archive, client, runrecord, synthetic
from digitserve import ports as ports_module
from digitserve.config import HOST, MODEL_NAME, MODEL_VERSION, STARTUP_TIMEOUT_S, Ports
from digitserve.grpc_stubs import management_pb2
from digitserve.model import DigitCNN
from digitserve.ports import port_is_free
from digitserve.server import ServerSettings, TorchServe, start_on_free_ports

pytestmark = pytest.mark.integration

DIGITSERVE = Path(sys.executable).with_name("digitserve")
#: A CLI ``serve start`` waits up to STARTUP_TIMEOUT_S; Python and Java start-up come on top.
CLI_TIMEOUT_S = STARTUP_TIMEOUT_S + 120
#: Calls that may wait behind a loaded worker on a busy 2-core machine.
CALL_DEADLINE_S = 60.0
POISON = b"poison"
DEAD_PROXY = "http://127.0.0.1:9"  # loopback's discard port: nothing listens there


# -- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """digit-model.mar of an untrained DigitCNN, and an unpacked model directory beside it."""
    folder = tmp_path_factory.mktemp("adversarial_store")
    torch.manual_seed(0)
    weights = folder / "untrained.pt"
    torch.save(DigitCNN().state_dict(), weights)
    mar = archive.build_archive(weights, model_store=folder)
    unpacked = folder / "unpacked"
    with zipfile.ZipFile(mar) as packed:
        packed.extractall(unpacked)
    manifest = unpacked / "MAR-INF" / "MANIFEST.json"
    manifest.write_text(manifest.read_text().replace(f'"{MODEL_NAME}"', '"unpackedmodel"'))
    return folder


@pytest.fixture(scope="module")
def png() -> bytes:
    return synthetic.png(np.eye(28, dtype=np.uint8) * 255)


def start(run_dir: Path, store: Path, recorder, **settings) -> TorchServe:
    server = start_on_free_ports(ServerSettings(run_dir=run_dir, model_store=store, **settings))
    recorder(server.process.pid)
    return server


def group(pgid: int) -> list[psutil.Process]:
    """Live (non-zombie) processes of the process group ``pgid``."""
    found = []
    for proc in psutil.process_iter(["status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (ProcessLookupError, psutil.Error):
            continue
    return found


def wait_gone(pgid: int, timeout_s: float = 60) -> list[psutil.Process]:
    end = time.monotonic() + timeout_s
    while (left := group(pgid)) and time.monotonic() < end:
        time.sleep(0.2)
    return left


def free_offset() -> int:
    """A DIGITSERVE_PORT_OFFSET whose five ports are free (below the ephemeral range)."""
    for offset in range(12_000 + os.getpid() % 97 * 100, 24_000, 100):
        if all(port_is_free(port + offset) for port in astuple(Ports())):
            return offset
    raise RuntimeError("no free port offset")


def digitserve(*args: str, env: dict[str, str], timeout: float = 120
               ) -> subprocess.CompletedProcess:
    return subprocess.run([str(DIGITSERVE), *args], env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


def one_line_failure(result: subprocess.CompletedProcess, status: int, text: str) -> None:
    """A failure is one line on stderr naming ``text``, a given exit status, no traceback."""
    assert result.returncode == status, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if not line.startswith("digitserve: ")]
    assert len(lines) == 1 and text in lines[0], result.stderr


# -- 1-4, 9: the record, the environment, the ports, the command line --------------------------
def test_cli_server_survives_stale_records_hostile_environment_and_a_crash(
    tmp_path, store, png, server_group_recorder
):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    offset = free_offset()
    user_config = tmp_path / "user-config.properties"  # what a former TorchServe user may have
    user_config.write_text(f"inference_address=http://0.0.0.0:{8080 + offset}\n"
                           "disable_token_authorization=true\nenable_model_api=true\n")
    shadow = tmp_path / "shadow"  # modules named like the archive's, first on PYTHONPATH
    shadow.mkdir()
    for name in ("preprocessing", "model"):
        (shadow / f"{name}.py").write_text("raise ImportError('the shadowing module loaded')\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIGITSERVE_")}
    env.update(DIGITSERVE_RUN_DIR=str(run_dir), DIGITSERVE_MODEL_STORE=str(store),
               DIGITSERVE_PORT_OFFSET=str(offset), PYTHONUNBUFFERED="1")
    hostile = {**env, "TS_CONFIG_FILE": str(user_config), "TS_ENABLE_MODEL_API": "true",
               "TS_DISABLE_TOKEN_AUTHORIZATION": "true", "JAVA_TOOL_OPTIONS": "-Dx=y",
               "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1", "LOCAL_RANK": "1",
               "PYTHONPATH": f"{shadow}{os.pathsep}{env.get('PYTHONPATH', '')}"}
    ports = Ports(*(port + offset for port in astuple(Ports())))

    # A stale record: its pid is now another process group of this user (a shell job).
    victim = subprocess.Popen(["sleep", "300"], start_new_session=True)
    started: list[int] = []
    try:
        stale = runrecord.RunRecord(
            pid=victim.pid, create_time=psutil.Process().create_time(),
            cmdline=(sys.executable, str(DIGITSERVE.with_name("torchserve")), "--start"),
            ports=ports, key_file=str(run_dir / "key_file.json"),
            log_file=str(run_dir / "torchserve.out"))
        runrecord.write(run_dir, stale)
        status = digitserve("serve", "status", env=env)
        assert status.returncode == 3 and "is now another program (sleep 300)" in status.stdout
        stopped = digitserve("serve", "stop", env=env)
        assert stopped.returncode == 0 and "no TorchServe was running" in stopped.stdout
        assert "stale" in stopped.stderr and "nothing was signalled" in stopped.stderr
        assert victim.poll() is None and not runrecord.path(run_dir).exists()

        # `serve start` removes the same stale record without signalling it, and ignores the
        # inherited TorchServe settings, saying so one line each.
        runrecord.write(run_dir, stale)
        result = digitserve("serve", "start", env=hostile, timeout=CLI_TIMEOUT_S)
        if runrecord.path(run_dir).exists():
            started.append(runrecord.read(run_dir).pid)
            server_group_recorder(started[-1])
        assert result.returncode == 0, result.stderr
        assert victim.poll() is None
        assert "removed the stale run record" in result.stderr
        for name in ("TS_CONFIG_FILE", "TS_ENABLE_MODEL_API", "TS_DISABLE_TOKEN_AUTHORIZATION",
                     "JAVA_TOOL_OPTIONS", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "LOCAL_RANK",
                     "PYTHONPATH"):
            assert f"left {name} out of TorchServe's environment" in result.stderr, name
            assert f"left {name} out" in (run_dir / "torchserve.out").read_text()
        record = runrecord.read(run_dir)
        assert oct(runrecord.path(run_dir).stat().st_mode)[-3:] == "600"
        listening = {conn.laddr.ip for conn in psutil.net_connections("tcp")
                     if conn.status == psutil.CONN_LISTEN and conn.laddr.port in astuple(ports)}
        assert listening and listening <= {"127.0.0.1", "::ffff:127.0.0.1"}, listening
        assert not any(conn.laddr.port == ports.metrics and conn.status == psutil.CONN_LISTEN
                       for conn in psutil.net_connections("tcp"))  # the tokenless metrics API
        with client.DigitClient.for_run_dir(run_dir, deadline_s=CALL_DEADLINE_S) as c:
            assert c.predict(png).model_version == MODEL_VERSION  # no shadowed module, rank 0
            with pytest.raises(client.ServingError, match="model API"):
                c.register("digit-model.mar")
        with grpc.insecure_channel(record.target("inference")) as channel:
            with pytest.raises(grpc.RpcError) as raised:  # the token is still required
                channel.unary_unary("/org.pytorch.serve.grpc.inference.InferenceAPIsService/"
                                    "Ping")(b"", timeout=10)
            assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED

        # CLI failures: one line and a distinct exit status each, never a traceback.
        one_line_failure(digitserve("stream", str(tmp_path), env=env), 4, "is a directory")
        zero = digitserve("predict", "/dev/zero", env=env)
        assert zero.returncode == 4 and "not a regular file" in json.loads(zero.stdout)["error"]
        if Path("/proc/sys/vm/drop_caches").exists():  # unreadable, even for root
            unreadable = digitserve("stream", "/proc/sys/vm/drop_caches", env=env)
            one_line_failure(unreadable, 4, "Permission denied")

        # 3. A crash leaves server-side connections in TIME_WAIT; a restart must not care.
        with client.DigitClient.for_run_dir(run_dir, deadline_s=CALL_DEADLINE_S) as c:
            c.predict(png)
            c.describe()
            os.killpg(record.pid, signal.SIGKILL)
            assert wait_gone(record.pid) == []
        with socket.socket() as plain:  # the old check (no SO_REUSEADDR) trips over them
            with pytest.raises(OSError):
                plain.bind((HOST, ports.grpc_inference))
        image = tmp_path / "x.png"
        image.write_bytes(png)
        unreachable = digitserve("predict", str(image), env=env)
        assert unreachable.returncode == 3, unreachable
        assert "TorchServe did not answer" in json.loads(unreachable.stdout)["error"]
        one_line_failure(digitserve("models", env=env), 3, "TorchServe did not answer")
        # A port really held by another process is named with its pid.
        with socket.socket() as holder:
            holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            holder.bind((HOST, ports.http_inference))
            holder.listen()
            refused = digitserve("serve", "start", env=env, timeout=CLI_TIMEOUT_S)
            held = f"http_inference {ports.http_inference} (pid {os.getpid()}: "
            one_line_failure(refused, 1, held)
            assert f"no process has pid {record.pid} any more" in refused.stderr
        restarted = digitserve("serve", "start", env=env, timeout=CLI_TIMEOUT_S)
        if runrecord.path(run_dir).exists():
            started.append(runrecord.read(run_dir).pid)
            server_group_recorder(started[-1])
        assert restarted.returncode == 0, restarted.stderr
        assert digitserve("serve", "stop", env=env).returncode == 0
        assert wait_gone(started[-1]) == []
        one_line_failure(digitserve("predict", "x.png", env=env), 3, "no TorchServe was started")
    finally:
        victim.kill()
        victim.wait()
        if runrecord.path(run_dir).exists():
            digitserve("serve", "stop", env=env)
        for pgid in started:
            if group(pgid):
                os.killpg(pgid, signal.SIGKILL)


def test_corrupt_and_foreign_records_get_one_line_and_no_signal(tmp_path):
    env = {**os.environ, "DIGITSERVE_RUN_DIR": str(tmp_path)}
    for text in ('{"pid": 12', "", "[]"):
        runrecord.path(tmp_path).write_text(text)
        status = digitserve("serve", "status", env=env)
        assert status.returncode == 3 and "is unreadable" in status.stdout
        assert "Traceback" not in status.stdout + status.stderr
        stopped = digitserve("serve", "stop", env=env)
        assert stopped.returncode == 0 and "nothing was signalled" in stopped.stderr
        assert not runrecord.path(tmp_path).exists()
    # pid 1 stands for another user's process (init): never signalled, the record goes.
    runrecord.write(tmp_path, runrecord.RunRecord(
        pid=1, create_time=0.0, cmdline=("torchserve",), ports=Ports(), key_file="k",
        log_file="l"))
    stopped = digitserve("serve", "stop", env=env)
    assert stopped.returncode == 0 and "stale" in stopped.stderr
    assert "(pid 1 " in stopped.stderr and not runrecord.path(tmp_path).exists()


# -- 4, 6, 10: a request that kills its worker, a full queue, the model and workflow APIs --------
POISON_HANDLER = '''
import json
import os
import signal

DELIVERED = {delivered!r}


def handle(data, context):
    if data is None:
        return None
    answers = []
    for row in data:
        body = row.get("data") or row.get("body") or b""
        if bytes(body) == {poison!r}:
            with open(DELIVERED, "a") as log:
                log.write(f"{{os.getpid()}}\\n")
            os.kill(os.getpid(), signal.SIGKILL)
        answers.append(json.dumps({{"digit": 0, "probability": 1.0,
                                    "probabilities": [1.0] + [0.0] * 9,
                                    "model_version": "1.0"}}))
    return answers
'''


def renamed(mar: Path, copy: Path, model_name: str) -> Path:
    """A copy of the archive ``mar`` whose manifest names another model."""
    with zipfile.ZipFile(mar) as source, zipfile.ZipFile(copy, "w") as target:
        for item in source.infolist():
            data = source.read(item)
            if item.filename == "MAR-INF/MANIFEST.json":
                data = data.replace(f'"{MODEL_NAME}"'.encode(), f'"{model_name}"'.encode())
            target.writestr(item, data)
    return copy


def workflow_archive(path: Path, mar: str) -> Path:
    """A workflow (.war) that registers the model ``mar`` of the store as ``wf__m1``."""
    with zipfile.ZipFile(path, "w") as war:
        war.writestr("WAR-INF/MANIFEST.json", json.dumps({
            "createdOn": "01/01/2026 00:00:00", "archiverVersion": "0.2.15",
            "workflow": {"workflowName": "wf", "specFile": "spec.yaml",
                         "handler": "handler.py"}}))
        war.writestr("spec.yaml", f"models:\n  min-workers: 1\n  max-workers: 1\n"
                                  f"  m1:\n    url: {mar}\ndag:\n  pre: [m1]\n")
        war.writestr("handler.py", "def pre(data, context):\n    return data\n")
    return path


@pytest.fixture(scope="module")
def poison_server(tmp_path_factory, server_group_recorder):
    """A handler that kills its own worker on POISON; a job queue of one request; the model
    API off; a workflow archive in the model store."""
    folder = tmp_path_factory.mktemp("poison")
    store = folder / "store"
    handler = folder / "poison_handler.py"
    handler.write_text(POISON_HANDLER.format(delivered=str(folder / "delivered"), poison=POISON))
    subprocess.run([str(Path(sys.executable).with_name("torch-model-archiver")),
                    "--model-name", MODEL_NAME, "--version", MODEL_VERSION, "--handler",
                    str(handler), "--export-path", str(folder)], check=True, timeout=120)
    store.mkdir()
    (folder / f"{MODEL_NAME}.mar").rename(store / "digit-model.mar")
    workflow_archive(store / "wf.war", "digit-model.mar")
    server = start(folder / "run", store, server_group_recorder,
                   extra_properties={"job_queue_size": "1"})
    server.delivered = folder / "delivered"
    yield server
    server.stop()


def delivered(server) -> int:
    return len(server.delivered.read_text().split()) if server.delivered.exists() else 0


def worker_pids(c: client.DigitClient) -> list[int]:
    (description,) = c.describe()
    return [worker["pid"] for worker in description["workers"]]


def wait_ready(c: client.DigitClient, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
    end = time.monotonic() + timeout_s
    while not c.is_ready() and time.monotonic() < end:
        time.sleep(0.5)
    assert c.is_ready()


def test_a_request_that_kills_its_worker_is_sent_twice_at_most(poison_server):
    with client.DigitClient.for_run_dir(poison_server.run_dir, deadline_s=180) as c:
        assert c.predict(b"fine").digit == 0
        before = delivered(poison_server)
        with pytest.raises(client.WorkerDiedError, match="sent twice") as raised:
            c.predict(POISON)
        # Before: RESOURCE_EXHAUSTED was retried by gRPC up to 4 times in all.
        assert delivered(poison_server) - before == 2
        assert raised.value.code in ("RESOURCE_EXHAUSTED", "INTERNAL")
        wait_ready(c)
        assert c.predict(b"fine").digit == 0  # the next worker serves the others


def test_a_full_queue_on_an_explicit_version_is_busy_not_missing(poison_server):
    with client.DigitClient.for_run_dir(poison_server.run_dir, deadline_s=CALL_DEADLINE_S) as c:
        wait_ready(c)
        seen = Counter()
        for _ in range(3):  # which calls find the one-request queue full depends on timing
            with ThreadPoolExecutor(48) as pool:
                results = list(pool.map(
                    lambda _: _outcome(lambda: c.predict(b"fine", version=MODEL_VERSION)),
                    range(48)))
            seen.update(type(result).__name__ for result in results)
            if seen["ServerBusyError"]:
                break
        assert seen["ServerBusyError"], seen
        assert set(seen) <= {"Prediction", "ServerBusyError"}, seen
        busy = next(r for r in results if isinstance(r, client.ServerBusyError))
        assert "job_queue_size" in str(busy) and "version 1.0" in str(busy)


def _outcome(call):
    try:
        return call()
    except client.ServingError as err:
        return err


def test_a_deadline_message_names_the_deadline_used(poison_server, monkeypatch):
    """ScaleWorker gets WORKER_DEADLINE_S (here 1 s) over the client's 0.2 s; starting a
    worker takes longer than either."""
    monkeypatch.setattr(client, "WORKER_DEADLINE_S", 1.0)
    with client.DigitClient.for_run_dir(poison_server.run_dir, deadline_s=0.2) as c:
        with pytest.raises(client.DeadlineError, match=r"deadline of 1 s"):
            c.scale(2)
    with client.DigitClient.for_run_dir(poison_server.run_dir, deadline_s=180) as c:
        c.scale(1)
        end = time.monotonic() + 60
        while len(worker_pids(c)) > 1 and time.monotonic() < end:
            time.sleep(0.5)


def test_with_the_model_api_off_workflows_cannot_register_models(poison_server):
    """The management key still scales and sets defaults (TorchServe has no switch for them);
    workflows, which register models even with the model API off, find nothing to load."""
    ports = poison_server.settings.ports
    key = json.loads(poison_server.key_file.read_text())["management"]["key"]
    base = f"http://{HOST}:{ports.http_management}"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def rest(method: str, path: str) -> tuple[int, dict]:
        request = urllib.request.Request(f"{base}{path}", method=method,
                                         headers={"Authorization": f"Bearer {key}"})
        try:
            with opener.open(request, timeout=CALL_DEADLINE_S) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    for url in ("wf.war", f"file://{poison_server.settings.model_store}/wf.war"):
        code, answer = rest("POST", f"/workflows?url={url}")
        assert code == 404, answer
        assert ("not found in workflow store" in answer["message"]
                or "does not match any allowed URL" in answer["message"]), answer
    assert rest("POST", "/models?url=digit-model.mar")[0] == 405
    # What the management key can still do with the model API off (TorchServe 0.12.0):
    assert rest("PUT", f"/models/{MODEL_NAME}/{MODEL_VERSION}/set-default")[0] == 200
    with client.DigitClient.for_run_dir(poison_server.run_dir, deadline_s=180) as c:
        assert "Default version" in c.set_default(MODEL_VERSION)
        assert [m["modelName"] for m in c.list_models()] == [MODEL_NAME]


# -- 6: with the model API on, only .mar files of the store ---------------------------------------
def test_with_the_model_api_on_only_mar_files_of_the_store_register(
    tmp_path, store, server_group_recorder, monkeypatch
):
    # The first ports chosen are taken before TorchServe binds them: it starts on others.
    from digitserve import server as server_module

    with socket.socket() as holder:
        holder.bind((HOST, 0))
        holder.listen()
        taken = Ports(*astuple(server_module.free_ports())[:4], holder.getsockname()[1])
        choices = iter([taken])
        monkeypatch.setattr(server_module, "free_ports",
                            lambda: next(choices, None) or ports_module.free_ports())
        server = start(tmp_path / "run", store, server_group_recorder, enable_model_api=True)
    assert server.settings.ports != taken
    try:
        with client.DigitClient.for_run_dir(server.run_dir, deadline_s=180) as c:
            for url in ("unpacked", str(store / "unpacked"), "../unpacked"):
                with pytest.raises(client.ServingError, match="file name of a .mar"):
                    c.register(url)
            for url in (f"file://{store}/unpacked", f"file://{tmp_path}/x.mar"):
                with pytest.raises(client.ServingError, match="does not match any allowed"):
                    c.register(url)
            # Bypassing the client: TorchServe's store holds links to .mar files only, so a
            # directory of the model store is not found by name...
            raw = management_pb2.RegisterModelRequest(url="unpacked", initial_workers=1,
                                                      synchronous=True)
            with pytest.raises(grpc.RpcError) as raised:
                c.management.RegisterModel(raw, timeout=180, metadata=c.metadata("management"))
            assert raised.value.code() == grpc.StatusCode.NOT_FOUND
            # ...but TorchServe 0.12.0 itself loads any directory given by its absolute path
            # (allowed_urls is not consulted for paths): only the management key guards it.
            raw.url = str(store / "unpacked")
            c.management.RegisterModel(raw, timeout=180, metadata=c.metadata("management"))
            assert "unpackedmodel" in [m["modelName"] for m in c.list_models()]
            c.unregister(model="unpackedmodel")
            # An archive made after the start is linked in and registers by its name.
            renamed(store / "digit-model.mar", store / "late.mar", "latemodel")
            assert c.register("late.mar").startswith('Model "latemodel" Version: 1.0 registered')
            assert (runrecord.served_store(server.run_dir) / "late.mar").is_symlink()
            c.unregister(model="latemodel")
    finally:
        (store / "late.mar").unlink(missing_ok=True)
        server.stop()


# -- 5, 7: token renewal under concurrency, through proxies that must not be used ------------------
def test_sixteen_callers_across_token_expiries_behind_a_dead_proxy(
    tmp_path, store, png, server_group_recorder, monkeypatch
):
    for name in ("http_proxy", "https_proxy", "grpc_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(name, DEAD_PROXY)
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    server = start(tmp_path / "run", store, server_group_recorder,
                   extra_properties={"token_expiration_min": "0.1"})  # 6 seconds
    try:
        with client.DigitClient.for_run_dir(server.run_dir, deadline_s=CALL_DEADLINE_S) as c:
            outcomes: Counter = Counter()
            end = time.monotonic() + 20  # three expiries at least
            start_line = threading.Barrier(16)

            def caller() -> None:
                start_line.wait()
                while time.monotonic() < end:
                    try:
                        c.predict(png)
                        outcomes["ok"] += 1
                    except Exception as err:  # noqa: BLE001 - every kind is counted
                        outcomes[f"{type(err).__name__}: {err}"] += 1

            threads = [threading.Thread(target=caller) for _ in range(16)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            assert set(outcomes) == {"ok"}, outcomes
            assert c.keys.renewals >= 2  # the keys did expire, and were renewed
            time.sleep(7)  # expired again: predict_many renews under 16 callers
            results = c.predict_many([png] * 64 + [b"not an image"], progress=False)
            assert all(isinstance(r, client.Prediction) for r in results[:64]), results[:64]
            assert isinstance(results[64], client.InvalidInputError)

            async def aio() -> list:
                async_client = client.AsyncDigitClient(c)
                try:
                    await asyncio.sleep(7)  # expired once more
                    return await async_client.predict_many([png] * 32, progress=False)
                finally:
                    await async_client.channel.close()

            assert all(isinstance(r, client.Prediction) for r in asyncio.run(aio()))
    finally:
        server.stop()


# -- 8: SIGTERM stops the server a process started ------------------------------------------------
STARTER = textwrap.dedent('''
    import sys, time
    from pathlib import Path
    from digitserve.server import ServerSettings, start_on_free_ports
    server = start_on_free_ports(ServerSettings(run_dir=Path(sys.argv[1]),
                                                model_store=Path(sys.argv[2])))
    print("ready", server.process.pid, flush=True)
    time.sleep(600)
''')


def test_a_run_directory_too_deep_for_a_unix_socket_still_serves(tmp_path, store,
                                                                  server_group_recorder):
    # A worker socket at run_dir/tmp/.ts.sock.9000 would be longer than a Unix socket path
    # can be (108 bytes): the worker could never start (it did in CI, under pytest's tmp_path).
    run_dir = tmp_path / ("deep" * 20) / "run"
    server = start_on_free_ports(ServerSettings(run_dir=run_dir, model_store=store))
    server_group_recorder(server.process.pid)
    try:
        assert runrecord.temp_dir(run_dir).parent == Path("/tmp")
        with client.DigitClient.for_run_dir(run_dir) as digits:
            assert digits.ping() == "Healthy"
            stroke = np.zeros((28, 28), np.uint8)
            stroke[4:24, 13:16] = 255  # a "1"
            assert 0 <= digits.predict(synthetic.png(stroke)).digit <= 9
    finally:
        server.stop()
    assert not runrecord.temp_dir(run_dir).exists()


def test_a_process_ended_by_sigterm_stops_its_server(tmp_path, store, server_group_recorder):
    starter = subprocess.Popen([sys.executable, "-c", STARTER, str(tmp_path / "run"), str(store)],
                               stdout=subprocess.PIPE, text=True)
    try:
        line = starter.stdout.readline()
        assert line.startswith("ready"), line
        pgid = int(line.split()[1])
        server_group_recorder(pgid)
        assert group(pgid)
        starter.send_signal(signal.SIGTERM)
        assert starter.wait(timeout=60) == -signal.SIGTERM  # it still ends as SIGTERM says
        assert wait_gone(pgid) == []
        assert not runrecord.path(tmp_path / "run").exists()
    finally:
        if starter.poll() is None:
            starter.kill()
            starter.wait()
        left = runrecord.read(tmp_path / "run")
        if left is not None and group(left.pid):
            os.killpg(left.pid, signal.SIGKILL)


def test_a_notebook_kernel_ended_by_sigterm_stops_its_server(tmp_path, store,
                                                              server_group_recorder):
    from jupyter_client.manager import KernelManager

    run_dir = tmp_path / "run"
    manager = KernelManager(kernel_name="python3")
    manager.start_kernel(env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    kernel = manager.client()
    kernel.start_channels()
    try:
        kernel.wait_for_ready(timeout=120)
        code = (f"from pathlib import Path\nfrom digitserve.server import ServerSettings, "
                f"start_on_free_ports\nserver = start_on_free_ports(ServerSettings("
                f"run_dir=Path({str(run_dir)!r}), model_store=Path({str(store)!r})))")
        reply = kernel.execute_interactive(code, timeout=CLI_TIMEOUT_S)
        record = runrecord.read(run_dir)
        if record is not None:
            server_group_recorder(record.pid)
        assert reply["content"]["status"] == "ok", reply["content"]
        assert group(record.pid)
        manager.signal_kernel(signal.SIGTERM)
        assert wait_gone(record.pid) == []
        end = time.monotonic() + 30
        while manager.is_alive() and time.monotonic() < end:
            time.sleep(0.2)
        assert not manager.is_alive()
    finally:
        kernel.stop_channels()
        if manager.is_alive():
            manager.shutdown_kernel(now=True)
        left = runrecord.read(run_dir)
        if left is not None and group(left.pid):
            os.killpg(left.pid, signal.SIGKILL)
