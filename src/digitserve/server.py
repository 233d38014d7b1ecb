"""Start, watch and stop TorchServe from Python without ever blocking a notebook cell.

``torchserve --start`` returns at once but leaves a Java child holding the pipes it inherited,
so ``subprocess.run(..., capture_output=True)`` or ``!torchserve --start`` in a notebook waits
for ever. Here TorchServe runs in the foreground of its own process session, its output goes to
a log file in the run directory, and stopping ends that whole session (frontend and workers).

The run directory holds ``config.properties``, the logs, TorchServe's pid file (its ``TMPDIR``),
``key_file.json`` (the token keys: TorchServe writes them into its working directory) and the
run record ``server.json`` (``digitserve.runrecord``). A process that started a server stops it
when it exits, also when it is ended by SIGTERM (a notebook kernel shut down, ``kill``).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import grpc
import psutil

from digitserve import control, runrecord
from digitserve.channel import Keys, open_channel
from digitserve.config import (
    ARCHIVE_NAME,
    DEFAULT_PORTS,
    HOST,
    MAX_MESSAGE_BYTES,
    MODEL_NAME,
    MODEL_STORE,
    MODEL_VERSION,
    PROBE_DEADLINE_S,
    RUN_DIR,
    STARTUP_TIMEOUT_S,
    Ports,
)
from digitserve.control import read_state, status, stop_run_dir, stop_session
from digitserve.environment import dropped_lines, kit_environment, reason
from digitserve.errors import PortsInUseError, ServerError, ServingError, token_refused
from digitserve.grpc_stubs import management_pb2, management_pb2_grpc
from digitserve.java import MIN_JAVA, Java, find_java, java_version
from digitserve.ports import busy_ports, free_ports, port_is_free
from digitserve.tls import Certificate

__all__ = [
    "MIN_JAVA", "Java", "ModelSpec", "PortsInUseError", "ServerError", "ServerSettings",
    "TorchServe", "config_properties", "diagnose_log", "find_java", "free_ports",
    "java_version", "port_is_free", "read_state", "start_on_free_ports", "status",
    "stop_run_dir", "stop_session", "tail",
]

STATE_FILE = runrecord.FILE_NAME
LOG_FILE = "torchserve.out"
KEY_FILE = "key_file.json"
#: The frontend's default JVM flags (``ServerSettings.vmargs``).
DEFAULT_VMARGS = "-Xmx1g -XX:+UseSerialGC"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSpec:
    """One model to load at start-up, with its batching and worker settings."""

    name: str = MODEL_NAME
    version: str = MODEL_VERSION
    mar: str = f"{ARCHIVE_NAME}.mar"
    workers: int = 1
    batch_size: int = 1
    max_batch_delay_ms: int = 5
    response_timeout_s: int = 120


@dataclass(frozen=True)
class ServerSettings:
    """Everything ``config.properties`` says; one instance per running server."""

    ports: Ports = DEFAULT_PORTS
    run_dir: Path = RUN_DIR
    model_store: Path = MODEL_STORE
    models: tuple[ModelSpec, ...] = (ModelSpec(),)
    token_auth: bool = True
    enable_model_api: bool = False
    max_request_bytes: int = MAX_MESSAGE_BYTES
    #: Torch (OpenMP) threads per worker. One: the Java frontend, the callers and the other
    #: workers need the same CPUs, and OpenMP threads spin while they wait for each other, so
    #: more threads make a busy server far slower (notebook 08 measures it).
    torch_threads: int = 1
    #: Serve gRPC over TLS with this certificate (see ``digitserve.tls``); None: plaintext.
    tls: Certificate | None = None
    extra_properties: dict[str, str] = field(default_factory=dict)
    #: The Java frontend's JVM flags (``vmargs`` in config.properties): a small heap and the
    #: serial collector, enough for one model and light on two cores.
    vmargs: str = DEFAULT_VMARGS
    #: A log4j2 XML file for the frontend (``torchserve --log-config``); None: TorchServe's own.
    log4j2_config: Path | None = None
    #: Extra variables for TorchServe and its workers, set after the kit's own
    #: (e.g. ``{"OMP_WAIT_POLICY": "PASSIVE"}``); not those the kit owns (``environment.DROPPED``).
    environment: Mapping[str, str] = field(default_factory=dict)


def config_properties(settings: ServerSettings) -> str:
    """The text of TorchServe's ``config.properties`` for these settings."""
    ports = settings.ports
    models = {
        spec.name: {
            spec.version: {
                "defaultVersion": True,
                "marName": spec.mar,
                "minWorkers": spec.workers,
                "maxWorkers": spec.workers,
                "batchSize": spec.batch_size,
                "maxBatchDelay": spec.max_batch_delay_ms,
                "responseTimeout": spec.response_timeout_s,
            }
        }
        for spec in settings.models
    }
    properties = {
        "inference_address": f"http://{HOST}:{ports.http_inference}",
        "management_address": f"http://{HOST}:{ports.http_management}",
        "metrics_address": f"http://{HOST}:{ports.metrics}",
        "grpc_inference_address": HOST,
        "grpc_management_address": HOST,
        "grpc_inference_port": str(ports.grpc_inference),
        "grpc_management_port": str(ports.grpc_management),
        # Links to the store's .mar files only (see runrecord.served_store).
        "model_store": str(runrecord.served_store(settings.run_dir)),
        "load_models": ",".join(f"{spec.name}={spec.mar}" for spec in settings.models),
        "models": json.dumps(models),
        "default_workers_per_model": "1",
        "max_request_size": str(settings.max_request_bytes),
        "max_response_size": str(settings.max_request_bytes),
        "disable_token_authorization": str(not settings.token_auth).lower(),
        "enable_model_api": str(settings.enable_model_api).lower(),
        # Models may come from the local model store only, as .mar files (the 2023
        # "ShellTorch" attacks used the open default, which lets the model API fetch and run
        # any URL).
        "allowed_urls": f"file://{settings.model_store}/[^/]+\\.mar",
        # Workflows (.war) register models too, even with the model API off; TorchServe looks
        # for them in the model store unless told otherwise: an empty private folder instead.
        "workflow_store": str(Path(settings.run_dir) / "workflows"),
        "install_py_dep_per_model": "false",
        "disable_system_metrics": "true",
        # The metrics API answers without a token; the kit reads no metrics from it.
        "enable_metrics_api": "false",
        "number_of_netty_threads": "2",
        "netty_client_threads": "2",
        "vmargs": settings.vmargs,
    }
    if settings.tls:
        properties.update(
            enable_grpc_ssl="true",
            certificate_file=str(settings.tls.cert),
            private_key_file=str(settings.tls.key),
        )
    properties.update(settings.extra_properties)
    return "".join(f"{key}={value}\n" for key, value in properties.items())


class TorchServe:
    """One TorchServe process session; usable as a context manager that always stops it."""

    def __init__(self, settings: ServerSettings = ServerSettings()) -> None:
        self.settings = settings
        self.run_dir = Path(settings.run_dir)
        self.process: subprocess.Popen | None = None
        #: Variables of this process's environment kept from TorchServe, and why.
        self.dropped_environment: dict[str, str] = {}
        self._log_offsets = [0, 0]

    @property
    def key_file(self) -> Path:
        return self.run_dir / KEY_FILE

    @property
    def log_file(self) -> Path:
        return self.run_dir / LOG_FILE

    def start(self, timeout_s: float = STARTUP_TIMEOUT_S) -> TorchServe:
        """Start TorchServe and return once every model answers; raise with the log otherwise."""
        previous = control.checked_record(self.run_dir)
        if previous is not None:
            process, why = runrecord.owned_process(previous)
            if process is not None:
                raise ServerError(
                    f"a TorchServe started from {self.run_dir} is already running (pid "
                    f"{previous.pid}): stop it first with `digitserve serve stop`."
                )
            log.warning("removed the stale run record of %s (%s); nothing was signalled.",
                        self.run_dir, why)
            runrecord.remove(self.run_dir)
        busy = busy_ports(self.settings.ports)
        if busy:
            raise PortsInUseError(
                f"port(s) already in use on {HOST}: {', '.join(busy)}. Stop what holds them "
                "(`digitserve serve stop` for a server of yours) or choose other ports "
                "(DIGITSERVE_PORT_OFFSET)."
            )
        missing = [s.mar for s in self.settings.models
                   if not (self.settings.model_store / s.mar).is_file()]
        if missing:
            raise ServerError(
                f"{', '.join(missing)} not found in {self.settings.model_store}: "
                "run `digitserve archive` (notebook 02) first."
            )
        self._command(self.run_dir / "config.properties")  # checks the log4j2 file first
        java = find_java()
        env = self._environment(java)
        for path in (self.run_dir, self.run_dir / "tmp", self.run_dir / "workflows"):
            path.mkdir(parents=True, exist_ok=True)
            os.chmod(path, 0o700)
        try:
            runrecord.make_temp_dir(self.run_dir)
        except runrecord.RunRecordError as err:
            raise ServerError(str(err)) from None
        runrecord.link_archives(self.settings.model_store, self.run_dir)
        self.key_file.unlink(missing_ok=True)
        self._log_offsets = [p.stat().st_size if p.is_file() else 0 for p in self._log_paths()]
        config = self.run_dir / "config.properties"
        config.write_text(config_properties(self.settings))
        with open(self.log_file, "ab") as out:
            out.write(f"\n=== starting with {java.source}: {java.executable} ===\n".encode())
            for line in dropped_lines(self.dropped_environment):
                out.write(f"=== {line}\n".encode())
                log.warning("%s", line)
            out.flush()
            self.process = subprocess.Popen(
                self._command(config), cwd=self.run_dir, env=env, stdin=subprocess.DEVNULL,
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )
        # A notebook kernel that ends (or a cell that fails and the kernel is shut down) still
        # stops the server it started; so does a process ended by SIGTERM.
        atexit.register(self.stop)
        control.stop_on_sigterm(self)
        try:
            runrecord.write(self.run_dir, runrecord.for_process(
                psutil.Process(self.process.pid), self.settings.ports, expect=str(config),
                java=asdict(java), host=HOST, key_file=str(self.key_file),
                log_file=str(self.log_file), model_store=str(self.settings.model_store),
                models=tuple(asdict(spec) for spec in self.settings.models),
                tls_cert=str(self.settings.tls.cert) if self.settings.tls else None,
                started_at=time.time(),
            ))
            self.wait_until_ready(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def detach(self) -> None:
        """Leave the server running after this process ends (``digitserve serve start``)."""
        atexit.unregister(self.stop)
        control.forget(self)

    def _command(self, config: Path) -> list[str]:
        """``torchserve`` in the foreground on ``config``, with the log4j2 file if one is set."""
        torchserve = Path(sys.executable).with_name("torchserve")
        command = [str(torchserve), "--start", "--foreground", "--ts-config", str(config),
                   "--model-store", str(runrecord.served_store(self.run_dir)), "--ncs"]
        if self.settings.log4j2_config is not None:
            log_config = Path(self.settings.log4j2_config)
            if not log_config.is_file():
                raise ServerError(f"the log4j2 configuration {log_config} does not exist.")
            command += ["--log-config", str(log_config.resolve())]
        return command

    def _log_paths(self) -> tuple[Path, Path]:
        return self.log_file, self.run_dir / "logs" / "model_log.log"

    def _new_log_text(self) -> str:
        """What the logs gained since this start (earlier runs append to the same files)."""
        text = ""
        for path, offset in zip(self._log_paths(), self._log_offsets, strict=True):
            if path.is_file():
                with open(path, "rb") as log_file:
                    log_file.seek(offset)
                    text += log_file.read().decode(errors="replace")
        return text

    def _environment(self, java: Java) -> dict[str, str]:
        """This process's environment less what the kit owns, plus the kit's own variables."""
        owned = [name for name in self.settings.environment if reason(name)]
        if owned:
            raise ServerError(
                f"ServerSettings.environment sets {', '.join(owned)}, which the kit keeps out of "
                "TorchServe's environment (see digitserve.environment.DROPPED); use "
                "ServerSettings fields or extra_properties for TorchServe's settings."
            )
        env, self.dropped_environment = kit_environment(os.environ)
        if java.home:
            env["JAVA_HOME"] = java.home
        else:
            env.pop("JAVA_HOME", None)
            env["PATH"] = f"{Path(java.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        # A private TMPDIR gives this server its own pid file, so several can run side by side.
        env["TMPDIR"] = str(self.run_dir / "tmp")
        # TorchServe puts its worker sockets in Java's temp dir, which it takes from $TEMP.
        env["TEMP"] = str(runrecord.temp_dir(self.run_dir))
        env["OMP_NUM_THREADS"] = str(self.settings.torch_threads)
        env["MKL_NUM_THREADS"] = str(self.settings.torch_threads)
        env["PYTHONUNBUFFERED"] = "1"
        env.update(self.settings.environment)
        return env

    def wait_until_ready(self, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
        """Poll DescribeModel over gRPC until every model has a READY worker."""
        deadline = time.monotonic() + timeout_s
        last = "no answer yet"
        tls = self.settings.tls.cert if self.settings.tls else None
        keys = Keys(self.key_file if self.settings.token_auth else None,
                    f"http://{HOST}:{self.settings.ports.http_management}", PROBE_DEADLINE_S)
        target = f"{HOST}:{self.settings.ports.grpc_management}"
        with open_channel(target, tls) as channel:
            stub = management_pb2_grpc.ManagementAPIsServiceStub(channel)
            while time.monotonic() < deadline:
                exited = self.process is not None and self.process.poll() is not None
                self._raise_diagnosis()
                if exited:
                    raise ServerError(
                        f"TorchServe exited with code {self.process.returncode} while starting."
                        f"\nLast lines of {self.log_file}:\n{tail(self.log_file)}"
                    )
                if self.key_file.exists() or not self.settings.token_auth:
                    try:
                        if all(_model_ready(stub, keys, spec) for spec in self.settings.models):
                            return
                        last = "workers not READY yet"
                    except (grpc.RpcError, ServingError, OSError, ValueError) as err:
                        last = err.details() if isinstance(err, grpc.RpcError) else str(err)
                time.sleep(0.25)
        raise ServerError(
            f"TorchServe did not serve {[s.name for s in self.settings.models]} within "
            f"{timeout_s:.0f} s ({last}).\nLast lines of {self.log_file}:\n{tail(self.log_file)}"
        )

    def _raise_diagnosis(self) -> None:
        text = self._new_log_text()
        diagnosis = diagnose_log(text)
        if diagnosis:
            error = PortsInUseError if "already in use" in diagnosis else ServerError
            raise error(f"{diagnosis}\nLast lines of {self.log_file}:\n{tail(self.log_file)}")

    def stop(self, timeout_s: float = 30) -> None:
        """Stop this server: SIGTERM its process session, then SIGKILL whatever is left."""
        if self.process is not None:
            # Our own child: its pid cannot have been reused before we reap it.
            control.stop_session(self.process.pid, timeout_s)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                pass
            self.process = None
        else:
            control.stop_recorded(self.run_dir, timeout_s)
        self.key_file.unlink(missing_ok=True)
        runrecord.remove(self.run_dir)
        atexit.unregister(self.stop)
        control.forget(self)

    def __enter__(self) -> TorchServe:
        """Start the server (unless this instance runs it already); stop it on leaving."""
        return self if self.process is not None else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_on_free_ports(settings: ServerSettings, attempts: int = 3,
                        timeout_s: float = STARTUP_TIMEOUT_S) -> TorchServe:
    """Start TorchServe on ports free now; if another process takes one of them before
    TorchServe binds it, start again on other ports (for tests and parallel runs)."""
    for attempt in range(1, attempts + 1):
        server = TorchServe(replace(settings, ports=free_ports()))
        try:
            return server.start(timeout_s)
        except PortsInUseError:
            if attempt == attempts:
                raise
    raise AssertionError("unreachable")


def _model_ready(stub, keys: Keys, spec: ModelSpec) -> bool:
    """True when ``spec`` has a READY worker; a key that expired while the workers load (a
    small ``token_expiration_min``) is renewed."""
    request = management_pb2.DescribeModelRequest(model_name=spec.name,
                                                  model_version=spec.version)
    metadata = keys.metadata("management")
    try:
        reply = stub.DescribeModel(request, timeout=PROBE_DEADLINE_S, metadata=metadata)
    except grpc.RpcError as err:
        if err.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INTERNAL):
            return False  # not registered yet
        if token_refused(err) and keys.renew("management", metadata):
            return False  # ask again with the new key
        raise
    return any(worker.get("status") == "READY"
               for entry in json.loads(reply.msg) for worker in entry.get("workers", []))


def diagnose_log(text: str) -> str | None:
    """A plain explanation when log text shows a server that can never start, else None.

    A handler that fails to import makes TorchServe restart its worker for ever ("Worker
    died"), so waiting longer never helps; a port taken between the check and the bind ends
    TorchServe.
    """
    if "AF_UNIX path too long" in text:
        return ("TorchServe's worker cannot open its socket: the path of its temp folder is too "
                "long for a Unix socket. Use a run directory with a shorter path.")
    missing = re.search(r"No module named '([^']+)'", text)
    if missing:
        return (
            f"TorchServe's worker died: the handler imports '{missing.group(1)}', which is not "
            "installed in the environment TorchServe runs in. Add it to pyproject.toml (and "
            "`make env`), or ship the module in the .mar with --extra-files."
        )
    if "BindException" in text or "Address already in use" in text:
        return ("TorchServe could not listen: a port was taken by another process after the "
                "kit checked it (port(s) already in use); start again or choose other ports.")
    if text.count("Worker died") >= 3:
        return ("TorchServe's worker keeps dying while loading the model (see the traceback "
                "in logs/model_log.log): fix the handler or the model file and archive again.")
    return None


def tail(path: Path, lines: int = 30) -> str:
    if not Path(path).is_file():
        return "(no log)"
    return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
