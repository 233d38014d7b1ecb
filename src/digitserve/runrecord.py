"""The run record: ``server.json`` in a run directory, the one description of a running server.

``server.TorchServe`` writes it when it starts TorchServe and removes it when it stops it; the
client reads the addresses, key file and certificate from it; ``status`` and ``stop`` read the
process it names. Its format is defined here and nowhere else.

A record can outlive its server (a reboot, ``kill -9``), and process ids are reused, so before
anything signals the pid of a record, ``owned_process`` checks that the process is still the
TorchServe the record describes: same creation time and command line, same user.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

from digitserve.config import HOST, Ports

FILE_NAME = "server.json"
#: Bump when a field changes meaning; records of another format are treated as unreadable.
FORMAT = 2
#: How far apart the recorded and the observed creation time of a process may be (seconds):
#: both come from the same clock tick count, so only float rounding separates them.
CREATE_TIME_TOLERANCE_S = 0.05


class RunRecordError(RuntimeError):
    """A record that cannot be read (corrupt, half-written, another format); the message says
    what was found and what to do."""


@dataclass(frozen=True)
class RunRecord:
    """What the kit knows about a TorchServe it started."""

    pid: int
    #: psutil's creation time and command line of ``pid`` right after it started.
    create_time: float
    cmdline: tuple[str, ...]
    ports: Ports
    key_file: str
    log_file: str
    host: str = HOST
    model_store: str = ""
    models: tuple[dict, ...] = ()
    tls_cert: str | None = None
    java: dict = field(default_factory=dict)
    started_at: float = 0.0
    uid: int = -1

    @property
    def token_api_url(self) -> str:
        """TorchServe's HTTP management address, where expired keys are renewed."""
        return f"http://{self.host}:{self.ports.http_management}"

    def target(self, api: str) -> str:
        """``host:port`` of the gRPC ``inference`` or ``management`` API."""
        return f"{self.host}:{getattr(self.ports, f'grpc_{api}')}"

    def to_dict(self) -> dict:
        """The record as plain JSON-ready data (also what ``server.status`` reports)."""
        data = asdict(self)
        data["cmdline"] = list(self.cmdline)
        data["models"] = list(self.models)
        return data


def path(run_dir: Path) -> Path:
    return Path(run_dir) / FILE_NAME


def for_process(process: psutil.Process, ports: Ports, expect: str = "",
                settle_s: float = 5.0, **fields) -> RunRecord:
    """A record for a freshly started process.

    Right after ``Popen`` returns, the kernel may not have set up the new program's arguments
    yet (an empty command line, or the parent's): the command line is read again until it
    contains ``expect`` (for up to ``settle_s``).
    """
    end = time.monotonic() + settle_s
    while True:
        with process.oneshot():
            cmdline = tuple(process.cmdline())
            record = RunRecord(pid=process.pid, create_time=process.create_time(),
                               cmdline=cmdline, ports=ports, uid=process.uids().real, **fields)
        if (cmdline and (not expect or expect in cmdline)) or time.monotonic() > end:
            return record
        time.sleep(0.01)


def write(run_dir: Path, record: RunRecord) -> Path:
    """Write the record atomically (a private temporary file, then ``os.replace``), mode 600."""
    target = path(run_dir)
    fd, tmp = tempfile.mkstemp(prefix=".server.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w") as out:
            json.dump({"format": FORMAT, **record.to_dict()}, out, indent=2)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def read(run_dir: Path) -> RunRecord | None:
    """The record of ``run_dir``; None when there is none; RunRecordError when unreadable."""
    source = path(run_dir)
    try:
        text = source.read_text()
    except FileNotFoundError:
        return None
    except OSError as err:
        raise RunRecordError(f"cannot read the run record {source} ({err.strerror}).") from None
    try:
        data = json.loads(text)
        if data.get("format") != FORMAT:
            raise ValueError(f"format {data.get('format')!r}, expected {FORMAT}")
        data.pop("format")
        if not isinstance(data["pid"], int) or data["pid"] <= 0:
            raise ValueError(f"pid {data['pid']!r}")
        if not isinstance(data["create_time"], (int, float)):
            raise ValueError(f"create_time {data['create_time']!r}")
        if not all(isinstance(part, str) for part in data["cmdline"]):
            raise ValueError("cmdline")
        data["ports"] = Ports(**data["ports"])
        data["cmdline"] = tuple(data["cmdline"])
        data["models"] = tuple(data.get("models", ()))
        return RunRecord(**data)
    except (ValueError, TypeError, KeyError, AttributeError) as err:
        raise RunRecordError(
            f"the run record {source} is unreadable ({type(err).__name__}: "
            f"{str(err)[:120]}): it was cut short or written by another version of the kit."
        ) from None


def remove(run_dir: Path) -> None:
    """Remove the record, and the short temp folder the server used if it had one."""
    path(run_dir).unlink(missing_ok=True)
    short = _short_temp_dir(run_dir)
    if short.is_dir() and not short.is_symlink() and short.stat().st_uid == os.getuid():
        shutil.rmtree(short, ignore_errors=True)


# -- where TorchServe's worker sockets go -----------------------------------------------------
#: The longest path a Unix socket can bind (``sun_path`` holds 108 bytes, the last a NUL).
UNIX_SOCKET_PATH_MAX = 107
#: The longest name TorchServe gives a worker socket inside its temp folder (``.ts.sock.9000``,
#: one port per worker from 9000 up).
_SOCKET_NAME = "/.ts.sock.65535"


def temp_dir(run_dir: Path) -> Path:
    """The temp folder for one server's TorchServe (``$TEMP``: its worker sockets and unpacked
    archives): ``run_dir/tmp``, unless the worker sockets' paths would be too long to bind
    there (a deep run directory); then a private folder with a short name under the system's
    temp folder, removed with the record. Without a folder of its own, every server on the
    host would share ``/tmp/.ts.sock.9000``."""
    inside = Path(run_dir).absolute() / "tmp"
    if len(os.fsencode(f"{inside}{_SOCKET_NAME}")) <= UNIX_SOCKET_PATH_MAX:
        return inside
    return _short_temp_dir(run_dir)


def _short_temp_dir(run_dir: Path) -> Path:
    # Named after the run directory, so that `serve stop` from another process finds it.
    digest = hashlib.sha256(os.fsencode(Path(run_dir).absolute())).hexdigest()[:16]
    return Path("/tmp") / f"digitserve-{os.getuid()}-{digest}"


def make_temp_dir(run_dir: Path) -> Path:
    """Create ``temp_dir(run_dir)`` readable by this user alone; refuse a short folder that
    someone else made (a name under ``/tmp`` can be taken first by another user)."""
    folder = temp_dir(run_dir)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = folder.lstat()
    if folder.is_symlink() or info.st_uid != os.getuid():
        raise RunRecordError(f"{folder} exists and is not a folder of yours: remove it, or "
                             "use a run directory with a shorter path")
    os.chmod(folder, 0o700)
    return folder


def owned_process(record: RunRecord) -> tuple[psutil.Process | None, str]:
    """The live process the record describes, or None and the reason it is not (any more).

    It is the process only when its pid, creation time, command line and user all match what
    was recorded at start: a pid reused by another program, or another user's process, is never
    taken for it.
    """
    try:
        process = psutil.Process(record.pid)
        with process.oneshot():
            create_time = process.create_time()
            uid = process.uids().real
            cmdline = tuple(process.cmdline())
            zombie = process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return None, f"no process has pid {record.pid} any more"
    except psutil.AccessDenied:
        return None, f"pid {record.pid} is now a process this user may not inspect"
    if uid != os.getuid() or (record.uid >= 0 and uid != record.uid):
        return None, f"pid {record.pid} now belongs to another user (uid {uid})"
    if abs(create_time - record.create_time) > CREATE_TIME_TOLERANCE_S or (
            record.cmdline and cmdline != record.cmdline):
        shown = " ".join(cmdline)[:80] or "?"
        return None, f"pid {record.pid} is now another program ({shown})"
    if zombie:
        return None, f"TorchServe (pid {record.pid}) has exited"
    return process, "running"


def pid_reused(record: RunRecord) -> bool:
    """True when the recorded pid now belongs to another process (not merely exited)."""
    process, why = owned_process(record)
    return process is None and not why.startswith(("no process", "TorchServe"))


def orphans(record: RunRecord) -> list[psutil.Process]:
    """Processes left in the record's process group after its leader exited (Java, workers).

    Linux never reuses a pid while a process group of that id has members, so a process whose
    group id is the recorded pid and that started after it belongs to that server.
    """
    found = []
    for process in psutil.process_iter(["status", "create_time", "uids"]):
        try:
            if (process.pid != record.pid and os.getpgid(process.pid) == record.pid
                    and process.info["status"] != psutil.STATUS_ZOMBIE
                    and process.info["uids"].real == os.getuid()
                    and process.info["create_time"]
                    >= record.create_time - CREATE_TIME_TOLERANCE_S):
                found.append(process)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return found


# -- the model store TorchServe is given ------------------------------------------------------
def served_store(run_dir: Path) -> Path:
    """The folder TorchServe takes as its model store: links to the ``.mar`` files of the real
    one, nothing else. TorchServe registers any directory of its store as an unpacked model
    (RegisterModel with ``url="somedir"``, no allowed_urls check for plain names): here none
    exists."""
    return Path(run_dir) / "model_store"


def link_archives(model_store: Path, run_dir: Path) -> Path:
    """Fill ``served_store(run_dir)`` afresh with a link to each ``.mar`` file of the store."""
    served = served_store(run_dir)
    served.mkdir(parents=True, exist_ok=True)
    os.chmod(served, 0o700)
    for entry in served.iterdir():
        if entry.is_symlink() or entry.is_file():
            entry.unlink()
        else:
            shutil.rmtree(entry)
    for mar in sorted(Path(model_store).glob("*.mar")):
        link_archive(model_store, run_dir, mar.name)
    return served


def link_archive(model_store: Path, run_dir: Path, name: str) -> bool:
    """Link one ``.mar`` file of the store into the served store (an archive made after the
    server started); False when ``name`` is not a plain ``.mar`` file name of the store."""
    source = Path(model_store) / name
    target = served_store(run_dir) / name
    if ("/" in name or not name.endswith(".mar") or not source.is_file()
            or source.is_symlink() and not source.resolve().is_file()):
        return False
    if not target.is_symlink():
        target.symlink_to(source.resolve())
    return True
