"""Which ports TorchServe can listen on, who holds the others, and free ports for tests.

TorchServe's listeners (Netty, and gRPC-Java over Netty) bind with ``SO_REUSEADDR``, so a port
whose old connections are still in TIME_WAIT (a server killed a moment ago) is free for them.
The check here binds the same way: only a socket that really holds the port makes it busy.
"""

from __future__ import annotations

import random
import socket
from dataclasses import astuple

import psutil

from digitserve.config import HOST, Ports

#: free_ports() picks from here: below Linux's ephemeral range (32768-60999), where outgoing
#: connections take their local ports, so a port picked now is not taken by a client a moment
#: later (the README asks workshops to keep DIGITSERVE_PORT_OFFSET in the same region).
FREE_PORT_RANGE = range(20_000, 32_000)


def port_is_free(port: int, host: str = HOST) -> bool:
    """True when a listener could bind ``host:port`` now, as TorchServe's do (SO_REUSEADDR)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def connections(process: psutil.Process, kind: str = "inet") -> list:
    """The sockets of ``process`` ([] when it is gone or not ours to see). psutil 6 renamed
    ``Process.connections`` to ``net_connections``; kserve 0.21 pins psutil below 6."""
    try:
        return getattr(process, "net_connections", process.connections)(kind=kind)
    except psutil.Error:
        return []


def holder(port: int) -> str:
    """Who listens on ``port``: ``pid 123: java ... ModelServer``, or why it cannot be told."""
    try:
        connections = psutil.net_connections(kind="tcp")
    except (psutil.AccessDenied, OSError):
        return "its process is not visible to this user"
    pids = {conn.pid for conn in connections
            if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN}
    if not pids:
        return "no listener visible: a socket bound without listening, or another user's"
    if None in pids:
        return "another user's process"
    names = []
    for pid in sorted(pids):
        try:
            command = " ".join(psutil.Process(pid).cmdline()) or psutil.Process(pid).name()
        except psutil.Error:
            command = "?"
        names.append(f"pid {pid}: {_short(command)}")
    return "; ".join(names)


def busy_ports(ports: Ports) -> list[str]:
    """``name port (holder)`` for every port of ``ports`` that a listener could not bind."""
    return [f"{name} {port} ({holder(port)})"
            for name, port in zip(Ports.__dataclass_fields__, astuple(ports), strict=True)
            if not port_is_free(port)]


def free_ports(rng: random.Random | None = None) -> Ports:
    """Five distinct ports nobody holds now, below the ephemeral range.

    Another process may still take one before TorchServe binds it:
    ``server.start_on_free_ports`` starts again on other ports when that happens.
    """
    rng = rng or random.SystemRandom()
    chosen: list[int] = []
    for _ in range(1000):
        port = rng.choice(FREE_PORT_RANGE)
        if port not in chosen and port_is_free(port):
            chosen.append(port)
            if len(chosen) == len(astuple(Ports())):
                return Ports(*chosen)
    raise OSError(f"no five free ports found in {FREE_PORT_RANGE}")


def _short(command: str, limit: int = 100) -> str:
    """A command line cut to ``limit`` characters, keeping TorchServe's class name visible."""
    if len(command) <= limit:
        return command
    for marker in ("org.pytorch.serve.ModelServer", "model_service_worker"):
        if marker in command:
            return f"{command[:limit - len(marker) - 5]} ... {marker}"
    return command[:limit - 3] + "..."
