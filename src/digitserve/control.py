"""Stop, inspect and guard a TorchServe known by its run record (``digitserve.runrecord``).

Nothing here signals a pid before checking that it is still the TorchServe the record
describes; a stale record is removed with a warning instead.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
import weakref
from dataclasses import asdict
from pathlib import Path

import grpc
import psutil
from google.protobuf import empty_pb2

from digitserve import runrecord
from digitserve.channel import Keys, open_channel
from digitserve.config import PROBE_DEADLINE_S, RUN_DIR
from digitserve.errors import ServingError
from digitserve.grpc_stubs import inference_pb2_grpc

KEY_FILE = "key_file.json"

log = logging.getLogger("digitserve.server")

#: Servers started by this process and not yet stopped: stopped on SIGTERM.
_RUNNING: weakref.WeakSet = weakref.WeakSet()
_previous_sigterm: object = None


def forget(server) -> None:
    """``server`` was stopped, or outlives this process on purpose: not stopped on SIGTERM."""
    _RUNNING.discard(server)


def _ping(record: runrecord.RunRecord) -> str:
    """TorchServe's health over gRPC Ping, e.g. ``"Healthy"``."""
    keys = Keys(Path(record.key_file))
    tls = Path(record.tls_cert) if record.tls_cert else None
    with open_channel(record.target("inference"), tls) as channel:
        reply = inference_pb2_grpc.InferenceAPIsServiceStub(channel).Ping(
            empty_pb2.Empty(), timeout=PROBE_DEADLINE_S, metadata=keys.metadata("inference"))
    return json.loads(reply.health).get("status", reply.health)


def stop_session(pid: int, timeout_s: float = 30,
                 record: runrecord.RunRecord | None = None) -> None:
    """Terminate the process group led by ``pid`` (frontend, Java and workers) and wait for it.

    With ``record``, the group's leader is checked again before the SIGKILL: a pid that became
    another program meanwhile is never signalled.
    """
    for sig, wait_s in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 10)):
        if sig == signal.SIGKILL and record is not None and runrecord.pid_reused(record):
            return
        try:
            os.killpg(pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        end = time.monotonic() + wait_s
        while time.monotonic() < end:
            if not _group_alive(pid):
                return
            time.sleep(0.1)


def stop_recorded(run_dir: Path, timeout_s: float) -> str:
    """Stop the server the record of ``run_dir`` names, if it is still that server.

    Returns ``"stopped"``, ``"none"`` (no record) or the reason the record was stale.
    """
    record = checked_record(run_dir)
    if record is None:
        return "none"
    process, why = runrecord.owned_process(record)
    if process is not None:
        stop_session(record.pid, timeout_s, record)
        return "stopped"
    left = runrecord.orphans(record)
    if left:  # the launcher died, Java or workers did not
        for proc in left:
            proc.terminate()
        _, alive = psutil.wait_procs(left, timeout=timeout_s)
        for proc in alive:
            proc.kill()
        return "stopped"
    return why


def checked_record(run_dir: Path) -> runrecord.RunRecord | None:
    """The run record, or None; an unreadable one is removed with a warning (never signalled)."""
    try:
        return runrecord.read(run_dir)
    except runrecord.RunRecordError as err:
        log.warning("%s Removed it; nothing was signalled.", err)
        runrecord.remove(run_dir)
        return None



def status(run_dir: Path = RUN_DIR) -> dict:
    """What is known about the server of ``run_dir``: running or not, addresses, key file."""
    try:
        record = runrecord.read(run_dir)
    except runrecord.RunRecordError as err:
        return {"running": False, "stale": True, "run_dir": str(run_dir),
                "message": f"{err} `digitserve serve start` replaces it."}
    if record is None:
        return {"running": False, "run_dir": str(run_dir),
                "message": f"no TorchServe was started from {run_dir}"}
    report = {**record.to_dict(), "ports": asdict(record.ports), "run_dir": str(run_dir)}
    process, why = runrecord.owned_process(record)
    if process is None:
        report.update(running=False, stale=True, message=(
            f"TorchServe (pid {record.pid}) is no longer running ({why}); its record is stale. "
            "`digitserve serve start` removes it and starts a new one."))
        return report
    try:
        report["health"] = _ping(record)
        report.update(running=True, message="TorchServe is running and answers over gRPC")
    except (grpc.RpcError, ServingError, OSError, ValueError) as err:
        detail = err.details() if isinstance(err, grpc.RpcError) else str(err)
        report.update(running=False, message=f"TorchServe's process is alive but gRPC fails: "
                                             f"{detail}")
    return report


def stop_run_dir(run_dir: Path = RUN_DIR) -> bool:
    """Stop the server recorded in ``run_dir``; False when none was running.

    A stale record (its pid gone, or now another program or another user's) is removed without
    signalling anything, with a warning that says so.
    """
    outcome = stop_recorded(Path(run_dir), timeout_s=30)
    if outcome not in ("stopped", "none"):
        log.warning("the run record of %s was stale (%s): removed it; nothing was signalled.",
                    run_dir, outcome)
    (Path(run_dir) / KEY_FILE).unlink(missing_ok=True)
    runrecord.remove(run_dir)
    return outcome == "stopped"


def read_state(run_dir: Path) -> dict | None:
    """The run record of ``run_dir`` as a dict (``pid``, ``host``, ``ports``, ``key_file``...)."""
    record = runrecord.read(run_dir)
    return None if record is None else {**record.to_dict(), "ports": asdict(record.ports)}



def _group_alive(pgid: int) -> bool:
    """True while any live (non-zombie) process is left in the process group ``pgid``."""
    for proc in psutil.process_iter(["status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                return True
        except (ProcessLookupError, psutil.Error):
            continue
    return False



def stop_on_sigterm(server) -> None:
    """Stop ``server`` (anything with ``stop(timeout_s=...)``) when this process gets SIGTERM,
    then end as SIGTERM would have. The handler is set from the main thread only (where Python
    sets handlers); a SIGTERM that was ignored stays ignored."""
    global _previous_sigterm
    _RUNNING.add(server)
    if threading.current_thread() is not threading.main_thread():
        return
    current = signal.getsignal(signal.SIGTERM)
    if current in (_on_sigterm, signal.SIG_IGN):
        return
    _previous_sigterm = current
    signal.signal(signal.SIGTERM, _on_sigterm)


def _on_sigterm(signum: int, frame: object) -> None:
    for server in list(_RUNNING):
        try:
            server.stop(timeout_s=10)
        except Exception:  # noqa: BLE001 - stop the others, then end anyway
            log.exception("stopping TorchServe on SIGTERM failed")
    previous = _previous_sigterm
    signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
    if callable(previous):
        previous(signum, frame)
    else:
        os.kill(os.getpid(), signal.SIGTERM)
