"""A two-node Ray cluster on this one machine, serving DigitCNN with the kit's gRPC contract.

``start`` runs ``ray start --head`` and ``ray start --address`` (each node one CPU, every port
explicit and distinct per node, from ``config.ClusterPorts``), writes the key file, deploys
``digitserve.ray_app`` behind Serve's gRPC proxy and waits until ``Ping`` answers. Then
``client()`` is a plain ``DigitClient``: the same code that calls TorchServe calls the cluster.
On a real cluster the nodes are machines and the same code is one address away (see
``deploy/rayservice.yaml`` for KubeRay).

What listens where, and why:

- Ray rewrites ``127.0.0.1`` (and ``localhost``) into the host's network address, so the nodes
  get the loopback addresses ``HEAD_IP`` and ``NODE_IP`` instead, which it keeps: two
  "machines" whose traffic never leaves this one. Some of Ray's own listeners still bind every
  interface, and Ray has no authentication unless asked (``RAY_AUTH_MODE=token``): whoever can
  reach those ports can run code in the cluster. On a laptop, keep a firewall up; on a cluster
  network, only the cluster's own machines may reach its ports.
- Serve's gRPC proxy binds ``[::]`` (every interface) and authenticates nobody: the deployment
  checks ``authorization: Bearer <key>`` itself, against the key file written here readable by
  its user alone (mode 0600), as TorchServe does.

Ray's driver work (deploying, asking where the replicas run) happens in a short child process
(``python -m digitserve.ray_driver deploy|describe SETTINGS``), so a notebook kernel or a test
process never becomes part of the cluster.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, astuple, dataclass, field
from pathlib import Path

import psutil

from digitserve.config import (
    ARCHIVE_NAME,
    CLUSTER_RUN_DIR,
    HOST,
    MODEL_NAME,
    MODEL_STORE,
    STARTUP_TIMEOUT_S,
    ClusterPorts,
)
from digitserve.server import ServerError, stop_session, tail

#: The nodes' addresses: loopback, but not the 127.0.0.1 that Ray rewrites.
HEAD_IP, NODE_IP = "127.0.0.2", "127.0.0.3"
NODE_NAMES = ("head", "node-2")
APP_NAME = "digitserve"
#: The environment variable that marks every process of one cluster (its value: the temp dir).
MARKER = "DIGITSERVE_RAY_CLUSTER"
STATE_FILE, KEY_FILE, SETTINGS_FILE = "cluster.json", "key_file.json", "cluster-settings.json"
#: Ray's startup waits, raised for a busy 2-core machine (the defaults give up after ~15 s).
RAY_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_agent_register_timeout_ms": "180000",
    "RAY_raylet_start_wait_time_s": "180",
    "OMP_NUM_THREADS": "1",
}


@dataclass(frozen=True)
class ClusterSettings:
    """What the cluster serves and how; ``replicas`` of one CPU each (two nodes, one CPU each)."""

    weights: Path = MODEL_STORE / f"{ARCHIVE_NAME}.mar"
    ports: ClusterPorts = field(default_factory=ClusterPorts)
    run_dir: Path = CLUSTER_RUN_DIR
    model_name: str = MODEL_NAME
    replicas: int = 2
    max_batch_size: int = 8
    batch_wait_timeout_s: float = 0.005

    @property
    def grpc_target(self) -> str:
        return f"{HOST}:{self.ports.serve_grpc}"

    @property
    def temp_dir(self) -> Path:
        """Ray's session files: short (socket paths are limited), one per cluster."""
        return Path(tempfile.gettempdir()) / f"digitserve-ray-{self.ports.gcs}"

    def to_json(self) -> dict:
        return {**asdict(self), "weights": str(self.weights), "run_dir": str(self.run_dir)}

    @classmethod
    def from_json(cls, data: dict) -> ClusterSettings:
        return cls(**{**data, "weights": Path(data["weights"]), "run_dir": Path(data["run_dir"]),
                      "ports": ClusterPorts(**data["ports"])})


def node_commands(settings: ClusterSettings) -> list[list[str]]:
    """The two ``ray start`` command lines: the head, then the second node."""
    ray, p = str(Path(sys.executable).with_name("ray")), settings.ports
    common = ["--num-cpus=1", "--disable-usage-stats", f"--temp-dir={settings.temp_dir}"]
    head = [ray, "start", "--head", f"--node-ip-address={HEAD_IP}", f"--port={p.gcs}",
            f"--ray-client-server-port={p.client_server}",
            f"--node-manager-port={p.head_node_manager}",
            f"--object-manager-port={p.head_object_manager}",
            f"--runtime-env-agent-port={p.head_runtime_env_agent}",
            f"--dashboard-agent-grpc-port={p.head_agent_grpc}",
            f"--dashboard-agent-listen-port={p.head_agent_http}",
            f"--metrics-export-port={p.head_metrics}",
            f"--min-worker-port={p.head_workers}",
            f"--max-worker-port={p.head_workers + p.WORKER_PORTS - 1}",
            "--include-dashboard=false", f"--dashboard-port={p.head_dashboard}",
            f"--dashboard-host={HEAD_IP}", *common]
    node = [ray, "start", f"--address={HEAD_IP}:{p.gcs}", f"--node-ip-address={NODE_IP}",
            f"--node-manager-port={p.node_node_manager}",
            f"--object-manager-port={p.node_object_manager}",
            f"--runtime-env-agent-port={p.node_runtime_env_agent}",
            f"--dashboard-agent-grpc-port={p.node_agent_grpc}",
            f"--dashboard-agent-listen-port={p.node_agent_http}",
            f"--metrics-export-port={p.node_metrics}",
            f"--min-worker-port={p.node_workers}",
            f"--max-worker-port={p.node_workers + p.WORKER_PORTS - 1}", *common]
    return [head, node]


def all_ports(ports: ClusterPorts) -> list[int]:
    """Every port the cluster may listen on, worker ranges included."""
    fixed = [port for port in astuple(ports)]
    workers = [start + i for start in (ports.head_workers, ports.node_workers)
               for i in range(ports.WORKER_PORTS)]
    return sorted(set(fixed + workers))


def bindable(port: int) -> bool:
    """True when nothing listens on ``port`` on any address (connections in TIME_WAIT, left by
    a server just stopped, do not count: servers bind with SO_REUSEADDR, and so does this)."""
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        try:
            sock.bind(("::", port))
        except OSError:
            return False
    return True


def environment(settings: ClusterSettings) -> dict[str, str]:
    """The nodes' environment: the proxy and replicas import this very ``digitserve``.

    ``MARKER`` names the cluster in every process Ray starts (workers rename themselves
    ``ray::…`` and leave their process group), so ``cluster_processes`` finds them all.
    """
    source = str(Path(__file__).resolve().parents[1])
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, **RAY_ENV, MARKER: str(settings.temp_dir),
            "PYTHONPATH": source + (os.pathsep + path if path else "")}


# -- start, status, stop ---------------------------------------------------------------------
def start(settings: ClusterSettings = ClusterSettings(), timeout_s: float = 2 * STARTUP_TIMEOUT_S
          ) -> dict:
    """Start both nodes, deploy the application and return the status once ``Ping`` answers."""
    run_dir = Path(settings.run_dir)
    if status(run_dir, describe=False).get("running"):
        raise ServerError(f"a cluster started from {run_dir} is already running: stop it first "
                          "with `digitserve cluster stop`.")
    stop(run_dir)  # a stale record
    if not Path(settings.weights).is_file():
        raise ServerError(f"no model at {settings.weights}: run `digitserve archive` "
                          "(notebook 02) first.")
    busy = [port for port in all_ports(settings.ports) if not bindable(port)]
    if busy:
        raise ServerError(f"port(s) already in use on {HOST}: {busy[:8]}. Stop what holds them "
                          "(`digitserve cluster stop`; `ss -ltnp` shows who) or set "
                          "DIGITSERVE_PORT_OFFSET.")
    began = time.perf_counter()
    run_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(run_dir, 0o700)
    key_file = write_key_file(run_dir / KEY_FILE)
    (run_dir / SETTINGS_FILE).write_text(json.dumps(settings.to_json(), indent=2))
    state = {"grpc_target": settings.grpc_target, "key_file": str(key_file),
             "model": settings.model_name, "temp_dir": str(settings.temp_dir),
             "process_groups": [], "started_at": time.time()}
    _write_state(run_dir, state)
    try:
        for name, command in zip(NODE_NAMES, node_commands(settings), strict=True):
            state["process_groups"].append(
                _ray_start(name, command, settings, timeout_s))
            _write_state(run_dir, state)
        _driver("deploy", run_dir, timeout_s)
        _wait_for_ping(settings, key_file, run_dir, timeout_s)
    except BaseException:
        stop(run_dir)
        raise
    state["cold_start_s"] = round(time.perf_counter() - began, 2)
    _write_state(run_dir, state)
    return status(run_dir)


def write_key_file(path: Path) -> Path:
    """Fresh keys in TorchServe's key-file format, readable by this user alone.

    The deployment accepts the ``inference`` key; the cluster has no management API, but the
    file has a ``management`` key too, as TorchServe's does, for clients that read both.
    """
    path.unlink(missing_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as file:
        json.dump({api: {"key": secrets.token_urlsafe(24)} for api in ("inference", "management")},
                  file)
    return path


def _ray_start(name: str, command: list[str], settings: ClusterSettings,
               timeout_s: float) -> int:
    """Run one ``ray start`` in a session of its own; its daemons keep that process group.

    Returns the group's id once ``ray start`` succeeded; fails at once when the node's raylet
    gave up (``ray start`` itself would wait minutes more for it).
    """
    log, temp_dir = Path(settings.run_dir) / f"ray-{name}.log", settings.temp_dir
    with open(log, "wb") as out:
        process = subprocess.Popen(command, env=environment(settings), stdin=subprocess.DEVNULL,
                                   stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline, code, failure, reported = time.monotonic() + timeout_s, None, "", set()
    while time.monotonic() < deadline and code is None and not failure:
        try:
            code = process.wait(timeout=0.25)
        except subprocess.TimeoutExpired:
            _report_agent_ports(settings, reported)
            failure = _raylet_failure(temp_dir)
    if code != 0:
        stop_session(process.pid, timeout_s=10)
        how = "timed out" if code is None and not failure else f"exit {code}"
        raise ServerError(f"`ray start` for the {name} node failed ({how}).\nLast lines of "
                          f"{log}:\n{tail(log)}{failure or _raylet_failure(temp_dir)}")
    return process.pid


def _report_agent_ports(settings: ClusterSettings, reported: set[str]) -> None:
    """Tell each new raylet the dashboard agent's port, which the kit chose (a busy-machine fix).

    Ray 2.60's raylet waits about 15 s for its dashboard agent, a Python process, to start and
    report its HTTP port in a file, and gives up the whole node when it is late; on a busy 2-core
    machine it often is. The kit gave that port on the command line, so it writes the same
    report into the same file (with Ray's own function) as soon as the raylet runs; the agent
    writes it again, with the same port, once it is up.
    """
    from ray._raylet import DASHBOARD_AGENT_LISTEN_PORT_NAME, persist_port

    ports = {settings.ports.head_node_manager: settings.ports.head_agent_http,
             settings.ports.node_node_manager: settings.ports.node_agent_http}
    for process in psutil.process_iter(["name", "cmdline"]):
        try:
            cmdline = process.info["cmdline"] or []
            if process.info["name"] != "raylet" or not cmdline:
                continue
            args = dict(arg[2:].split("=", 1) for arg in cmdline[1:]
                        if arg.startswith("--") and "=" in arg)
            port = ports.get(int(args.get("node_manager_port", 0)))
            if (port is None or args.get("temp_dir") != str(settings.temp_dir)
                    or args["node_id"] in reported):
                continue
            persist_port(args["session_dir"], args["node_id"], DASHBOARD_AGENT_LISTEN_PORT_NAME,
                         port)
            reported.add(args["node_id"])
        except (psutil.Error, KeyError, ValueError):
            continue


def _raylet_failure(temp_dir: Path) -> str:
    """What a raylet that gave up said, with the one cause a learner can act on; else ""."""
    lines = [line for log in Path(temp_dir).glob("session_2*/logs/raylet*.out")
             for line in log.read_text(errors="replace").splitlines() if "Check failed" in line]
    if not lines:
        return ""
    said = lines[-1].split("Check failed:")[-1].strip()
    hint = ("\nRay's raylet waits about 15 s (a limit of Ray 2.60 that no setting changes) for "
            "its dashboard agent, a Python process that needs ~3 s of CPU to start: on a busy "
            "machine that is not enough. Try again when the machine is quieter (`uptime`).")
    return f"\nRay's raylet gave up: {said}" + (hint if "Timed out waiting" in said else "")


def _driver(action: str, run_dir: Path, timeout_s: float) -> dict:
    """Run ``python -m digitserve.ray_driver ACTION`` (a short-lived Ray driver); its answer."""
    log = run_dir / "driver.log"
    settings = ClusterSettings.from_json(json.loads((run_dir / SETTINGS_FILE).read_text()))
    with open(log, "ab") as err:
        done = subprocess.run([sys.executable, "-m", "digitserve.ray_driver", action,
                               str(run_dir / SETTINGS_FILE)], env=environment(settings),
                              stdout=subprocess.PIPE, stderr=err, timeout=timeout_s, check=False)
    if done.returncode != 0:
        raise ServerError(f"the Ray driver could not {action} (exit {done.returncode}).\n"
                          f"Last lines of {log}:\n{tail(log)}")
    return json.loads(done.stdout.decode().strip().splitlines()[-1])


def _wait_for_ping(settings: ClusterSettings, key_file: Path, run_dir: Path,
                   timeout_s: float) -> None:
    from digitserve.client import DigitClient, ServingError

    deadline, last = time.monotonic() + timeout_s, "no answer yet"
    with DigitClient(settings.grpc_target, settings.grpc_target, key_file=key_file,
                     deadline_s=10, model_name=settings.model_name) as client:
        while time.monotonic() < deadline:
            try:
                if client.ping() == "Healthy":
                    return
            except ServingError as err:
                last = str(err)
            time.sleep(0.5)
    raise ServerError(f"the cluster did not answer Ping within {timeout_s:.0f} s ({last}).\n"
                      f"Last lines of {run_dir / 'driver.log'}:\n{tail(run_dir / 'driver.log')}")


def status(run_dir: Path = CLUSTER_RUN_DIR, describe: bool = True) -> dict:
    """Where the cluster stands: target, key file, nodes, replicas (and where each runs), memory.

    ``describe=False`` skips asking Ray (a child process, a few seconds) for nodes and replicas.
    """
    state = _read_state(run_dir)
    if state is None:
        return {"running": False, "message": f"no cluster was started from {run_dir}"}
    processes = cluster_processes(state)
    if not processes:
        return {**state, "running": False, "message": "the cluster's processes are gone: "
                "`digitserve cluster start` cleans up and starts a new one."}
    rss, pss = memory_mb(processes)
    report = {**state, "running": True, "processes": len(processes), "rss_mb": rss,
              "pss_mb": pss,
              "message": f"the cluster serves {state['model']} on {state['grpc_target']}"}
    if describe:
        try:
            report.update(_driver("describe", Path(run_dir), STARTUP_TIMEOUT_S))
        except (ServerError, subprocess.TimeoutExpired, ValueError) as err:
            report.update(running=False, message=f"the cluster's processes run but Ray does "
                          f"not answer: {err}")
    return report


def stop(run_dir: Path = CLUSTER_RUN_DIR) -> bool:
    """End every process of the cluster (both nodes, Serve, replicas); False when none ran."""
    state = _read_state(run_dir)
    if state is None:
        return False
    processes = cluster_processes(state)
    was_running = bool(processes)
    for process in processes:  # both nodes at once: raylets end their workers, then exit
        try:
            process.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(processes, timeout=10)
    for process in alive + cluster_processes(state):
        try:
            process.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(cluster_processes(state), timeout=5)
    import shutil

    shutil.rmtree(state.get("temp_dir", ""), ignore_errors=True)
    (Path(run_dir) / STATE_FILE).unlink(missing_ok=True)
    (Path(run_dir) / KEY_FILE).unlink(missing_ok=True)
    return was_running


def cluster_processes(state: dict) -> list[psutil.Process]:
    """Live processes of the cluster: marked with its temp dir, or in its process groups."""
    groups, temp_dir = set(state.get("process_groups", [])), state.get("temp_dir") or "\0"
    found = []
    for process in psutil.process_iter(["status"]):
        try:
            if process.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if os.getpgid(process.pid) in groups or process.environ().get(MARKER) == temp_dir:
                found.append(process)
        except (ProcessLookupError, psutil.Error):
            continue
    return found


def client(run_dir: Path = CLUSTER_RUN_DIR, **kwargs):
    """A ``DigitClient`` for the cluster: target and key file from its state."""
    from digitserve.client import DigitClient, ServerUnavailableError

    state = _read_state(run_dir)
    if state is None:
        raise ServerUnavailableError(f"no cluster was started from {run_dir}: run "
                                     "`digitserve cluster start` (or notebook 09) first.")
    return DigitClient(state["grpc_target"], state["grpc_target"],
                       key_file=Path(state["key_file"]), model_name=state["model"], **kwargs)


def _read_state(run_dir: Path) -> dict | None:
    path = Path(run_dir) / STATE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def _write_state(run_dir: Path, state: dict) -> None:
    (Path(run_dir) / STATE_FILE).write_text(json.dumps(state, indent=2))


def memory_mb(processes: list[psutil.Process]) -> tuple[float, float]:
    """Resident memory of ``processes`` in MB: RSS summed, and PSS summed.

    RSS counts a page shared by several processes (libraries, Ray's object store) once per
    process; PSS splits it among them, so its sum is what the processes hold together.
    """
    rss = pss = 0
    for process in processes:
        try:
            info = process.memory_full_info()
        except psutil.Error:
            continue
        rss, pss = rss + info.rss, pss + getattr(info, "pss", info.rss)
    return round(rss / 2**20, 1), round(pss / 2**20, 1)


# -- the command line --------------------------------------------------------------------------
def add_commands(subparsers) -> None:
    """``digitserve cluster start|status|stop``."""
    command = subparsers.add_parser(
        "cluster", help="start, stop or inspect a two-node Ray Serve cluster serving DigitCNN")
    command.add_argument("action", choices=("start", "stop", "status"))
    command.add_argument("--json", action="store_true", help="status as JSON")
    command.add_argument("--weights", type=Path, default=ClusterSettings.weights,
                         help="a .mar (the default: the one TorchServe serves) or weights file")
    command.set_defaults(run=run_cluster)


def run_cluster(args: argparse.Namespace) -> int:
    if args.action == "start":
        report = start(ClusterSettings(weights=args.weights))
        print(f"The cluster serves {report['model']} on {report['grpc_target']} (key file "
              f"{report['key_file']}), replicas on: "
              f"{', '.join(str(r['node']) for r in report.get('replicas', []))}")
        return 0
    if args.action == "stop":
        print("The cluster stopped" if stop() else f"no cluster was running from {CLUSTER_RUN_DIR}")
        return 0
    report = status()
    print(json.dumps(report, indent=2) if args.json else report["message"])
    return 0 if report.get("running") else 3
