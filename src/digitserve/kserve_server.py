"""KServe's ModelServer serving DigitCNN: a second, independent Open Inference Protocol server.

``DigitModel`` is a ``kserve.Model`` that answers through ``digitserve.predictor`` (the handler's
preprocessing, weights and answer), so the same ``OipClient`` call gets the same answer from
TorchServe and from KServe. ``start`` runs the ModelServer in a process session of its own
(``python -m digitserve.kserve_server SETTINGS``), like ``digitserve.server`` runs TorchServe;
``digitserve kserve start|status|stop`` calls these functions.

Where it listens: KServe 0.21 binds every interface (gRPC ``[::]``, REST ``0.0.0.0``) and has no
setting for it, and it has no authentication. The kit narrows both listeners to
``config.HOST`` (loopback) in this process, for this pinned version, and ``status`` reports the
addresses the process really listens on. KServe's defaults, 8080/8081, are TorchServe's: both
ports always come from ``config.KServePorts``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import psutil

from digitserve.cluster import bindable
from digitserve.config import (
    ARCHIVE_NAME,
    HOST,
    KSERVE_RUN_DIR,
    MODEL_NAME,
    MODEL_STORE,
    STARTUP_TIMEOUT_S,
    KServePorts,
)
from digitserve.ports import connections
from digitserve.server import ServerError, stop_session, tail

STATE_FILE = "kserve.json"
LOG_FILE = "kserve.log"
SETTINGS_FILE = "kserve-settings.json"


@dataclass(frozen=True)
class KServeSettings:
    """What the KServe process serves, and where."""

    weights: Path = MODEL_STORE / f"{ARCHIVE_NAME}.mar"
    ports: KServePorts = field(default_factory=KServePorts)
    run_dir: Path = KSERVE_RUN_DIR
    model_name: str = MODEL_NAME
    #: Torch threads in the server process.
    threads: int = 1


# -- inside the KServe process ---------------------------------------------------------------
def model_class():
    """``DigitModel``, defined on first use so that importing this module needs no kserve."""
    import kserve
    from kserve.errors import InvalidInput
    from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse

    from digitserve import preprocessing
    from digitserve.predictor import OIP_OUTPUTS, DigitPredictor

    class DigitModel(kserve.Model):
        """DigitCNN as a KServe model: one image per request, the handler's three outputs."""

        def __init__(self, name: str, weights: Path, threads: int = 1) -> None:
            super().__init__(name)
            self.weights, self.threads = Path(weights), threads
            self.predictor: DigitPredictor | None = None

        def load(self) -> bool:
            self.predictor = DigitPredictor(self.weights, threads=self.threads)
            self.ready = True
            return self.ready

        def predict(self, payload: InferRequest, headers: dict | None = None,
                    response_headers: dict | None = None) -> InferResponse:
            if len(payload.inputs) != 1:
                raise InvalidInput(f"an Open Inference Protocol request must hold exactly one "
                                   f"input tensor; it holds {len(payload.inputs)}")
            tensor = payload.inputs[0]
            try:
                data = tensor.as_numpy().ravel().tolist()
                image = preprocessing.payload_from_tensor(tensor.datatype, tensor.shape, data)
            except (preprocessing.InvalidInput, ValueError, TypeError) as err:
                raise InvalidInput(str(err)) from None
            answer = self.predictor.predict([image])[0]
            if "error" in answer:
                raise InvalidInput(answer["error"])
            outputs = []
            for name, datatype, key in OIP_OUTPUTS:
                values = np.atleast_1d(np.asarray(
                    answer[key], dtype=np.int64 if datatype == "INT64" else np.float32))
                output = InferOutput(name=name, shape=list(values.shape), datatype=datatype)
                output.set_data_from_numpy(values, binary_data=True)  # raw_output_contents
                outputs.append(output)
            return InferResponse(response_id=payload.id or "", model_name=self.name,
                                 model_version=self.predictor.version, infer_outputs=outputs)

    return DigitModel


def _loopback_only() -> None:
    """Make KServe 0.21's two listeners bind ``HOST`` instead of every interface."""
    import grpc
    from kserve import model_server
    from kserve.protocol.grpc import server as grpc_server

    class LoopbackAio:
        """Stands in for ``grpc.aio`` in KServe's gRPC server module: binds loopback."""

        @staticmethod
        def server(*args, **kwargs):
            server = grpc.aio.server(*args, **kwargs)
            bind = server.add_insecure_port
            server.add_insecure_port = lambda address: bind(f"{HOST}:{address.rsplit(':', 1)[1]}")
            return server

    class LoopbackRESTServer(model_server.RESTServer):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.config.host = HOST

    grpc_server.aio = LoopbackAio()
    model_server.RESTServer = LoopbackRESTServer


def serve(settings_file: Path) -> None:
    """Run the ModelServer in this process until it is stopped (SIGTERM)."""
    settings = json.loads(Path(settings_file).read_text())
    import kserve

    _loopback_only()
    model = model_class()(settings["model_name"], Path(settings["weights"]), settings["threads"])
    model.load()
    kserve.ModelServer(http_port=settings["ports"]["http"], grpc_port=settings["ports"]["grpc"],
                       workers=1, grace_period=2, enable_latency_logging=False).start([model])


# -- driving it from outside ---------------------------------------------------------------------
def start(settings: KServeSettings = KServeSettings(), timeout_s: float = STARTUP_TIMEOUT_S
          ) -> dict:
    """Start KServe serving DigitCNN and return its status once the model is ready."""
    run_dir = Path(settings.run_dir)
    previous = status(run_dir)
    if previous.get("running"):
        raise ServerError(f"a KServe started from {run_dir} is already running (pid "
                          f"{previous['pid']}): stop it first with `digitserve kserve stop`.")
    stop(run_dir)  # a stale record
    if not Path(settings.weights).is_file():
        raise ServerError(f"no model at {settings.weights}: run `digitserve archive` "
                          "(notebook 02) first.")
    busy = [f"{name} {port}" for name, port in asdict(settings.ports).items()
            if not bindable(port)]
    if busy:
        raise ServerError(f"port(s) already in use on {HOST}: {', '.join(busy)}. Stop what holds "
                          "them (`digitserve kserve stop`; `ss -ltnp` shows who) or set "
                          "DIGITSERVE_PORT_OFFSET.")
    run_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(run_dir, 0o700)
    settings_file = run_dir / SETTINGS_FILE
    settings_file.write_text(json.dumps({**asdict(settings), "weights": str(settings.weights),
                                         "run_dir": str(run_dir)}, indent=2))
    env = {**os.environ, "OMP_NUM_THREADS": str(settings.threads), "PYTHONUNBUFFERED": "1"}
    with open(run_dir / LOG_FILE, "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "digitserve.kserve_server", str(settings_file)],
            cwd=run_dir, env=env, stdin=subprocess.DEVNULL, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )
    target = f"{HOST}:{settings.ports.grpc}"
    (run_dir / STATE_FILE).write_text(json.dumps({
        "pid": process.pid, "grpc_target": target, "http_target": f"{HOST}:{settings.ports.http}",
        "model": settings.model_name, "weights": str(settings.weights),
        "log_file": str(run_dir / LOG_FILE), "started_at": time.time(),
    }, indent=2))
    try:
        _wait_until_ready(process, target, settings.model_name, run_dir, timeout_s)
    except BaseException:
        stop(run_dir)
        raise
    return status(run_dir)


def _wait_until_ready(process: subprocess.Popen, target: str, model: str, run_dir: Path,
                      timeout_s: float) -> None:
    from digitserve.client import ServingError
    from digitserve.oip import OipClient

    deadline = time.monotonic() + timeout_s
    last = "no answer yet"
    with OipClient.for_target(target, deadline_s=5, model_name=model) as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise ServerError(f"KServe exited with code {process.returncode} while starting."
                                  f"\nLast lines of {run_dir / LOG_FILE}:\n"
                                  f"{tail(run_dir / LOG_FILE)}")
            try:
                if client.model_ready():
                    return
                last = "the model is not ready yet"
            except ServingError as err:
                last = str(err)
            time.sleep(0.5)
    raise ServerError(f"KServe did not serve {model} within {timeout_s:.0f} s ({last}).\n"
                      f"Last lines of {run_dir / LOG_FILE}:\n{tail(run_dir / LOG_FILE)}")


def status(run_dir: Path = KSERVE_RUN_DIR) -> dict:
    """What is known of the KServe of ``run_dir``: running or not, target, listening addresses."""
    path = Path(run_dir) / STATE_FILE
    if not path.is_file():
        return {"running": False, "message": f"no KServe was started from {run_dir}"}
    state = json.loads(path.read_text())
    try:
        processes = [psutil.Process(state["pid"])]
        processes += processes[0].children(recursive=True)
    except psutil.NoSuchProcess:
        return {**state, "running": False, "message": f"KServe (pid {state['pid']}) is no longer "
                "running: `digitserve kserve start` cleans up and starts a new one."}
    listening = sorted({f"{c.laddr.ip}:{c.laddr.port}" for p in processes
                        for c in connections(p) if c.status == psutil.CONN_LISTEN})
    return {**state, "running": True, "listening": listening,
            "rss_mb": round(sum(_rss(p) for p in processes) / 2**20, 1),
            "message": f"KServe is serving {state['model']} on {state['grpc_target']}"}


def stop(run_dir: Path = KSERVE_RUN_DIR) -> bool:
    """Stop the KServe of ``run_dir`` (its whole process session); False when none ran."""
    path = Path(run_dir) / STATE_FILE
    if not path.is_file():
        return False
    pid = json.loads(path.read_text())["pid"]
    was_running = psutil.pid_exists(pid)
    stop_session(pid, timeout_s=15)
    path.unlink(missing_ok=True)
    return was_running


def _rss(process: psutil.Process) -> int:
    try:
        return process.memory_info().rss
    except psutil.Error:
        return 0


def reference_infer(target: str, image: bytes, model: str = MODEL_NAME,
                    timeout_s: float = 60) -> dict:
    """One ModelInfer through KServe's own ``InferenceGRPCClient``: its outputs by name.

    The reference for ``OipClient`` (KServe's stubs and decoding, not the kit's). It runs in a
    thread of its own, so it works where an event loop already runs (a notebook).
    """
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from kserve import InferenceGRPCClient
    from kserve.protocol.infer_type import InferInput, InferRequest

    async def infer() -> dict:
        client = InferenceGRPCClient(target, timeout=timeout_s)
        try:
            request = InferRequest(model_name=model, infer_inputs=[
                InferInput(name="image", shape=[1], datatype="BYTES", data=[image])])
            reply = await client.infer(request)
            return {output.name: output.as_numpy().tolist() for output in reply.outputs}
        finally:
            await client.close()

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, infer()).result()


# -- the command line --------------------------------------------------------------------------
def add_commands(subparsers) -> None:
    """``digitserve kserve start|status|stop``."""
    command = subparsers.add_parser(
        "kserve", help="start, stop or inspect KServe's ModelServer serving DigitCNN (OIP)")
    command.add_argument("action", choices=("start", "stop", "status"))
    command.add_argument("--json", action="store_true", help="status as JSON")
    command.add_argument("--weights", type=Path, default=KServeSettings.weights,
                         help="a .mar (the default: the one TorchServe serves) or weights file")
    command.set_defaults(run=run_kserve)


def run_kserve(args: argparse.Namespace) -> int:
    if args.action == "start":
        report = start(KServeSettings(weights=args.weights))
        print(f"KServe is serving {report['model']}: Open Inference Protocol over gRPC on "
              f"{report['grpc_target']} (no token); listening on {', '.join(report['listening'])}"
              f"; log {report['log_file']}")
        return 0
    if args.action == "stop":
        print("KServe stopped" if stop() else f"no KServe was running from {KSERVE_RUN_DIR}")
        return 0
    report = status()
    print(json.dumps(report, indent=2) if args.json else report["message"])
    return 0 if report.get("running") else 3


if __name__ == "__main__":
    serve(Path(sys.argv[1]))
