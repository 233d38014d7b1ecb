"""Count the bytes a client and a server exchange: a loopback TCP proxy that forwards and counts.

``WireCounter(target_port)`` listens on 127.0.0.1 on a free port and forwards every connection
it accepts to ``target_host:target_port``, counting the bytes that pass in each direction and
the connections it accepted. Point a client at ``counter.port`` instead of the server's port and
read the counts afterwards: they are what went over TCP (HTTP/2 or HTTP/1.1 framing, headers,
TLS records if any), not what the application thinks it sent.

    with WireCounter(server_port) as wire:
        call_the_server(port=wire.port)
        wire.wait_quiet()          # let trailing frames (acks, window updates) arrive
        print(wire.counts())       # Traffic(sent=..., received=..., connections=...)

The counts are exact: every byte is added (under a lock) as soon as the proxy reads it from
one side, before it writes it to the other, so once a client has an answer, the bytes of that
answer are already counted. The proxy adds a little latency (one more loopback hop, a thread
per direction): count bytes with it, time calls without it. Traffic only ever goes to loopback
addresses; any other target is refused.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from dataclasses import dataclass

#: Bytes read from a socket at a time.
CHUNK = 65536


@dataclass(frozen=True)
class Traffic:
    """Bytes that passed the proxy: ``sent`` client → server, ``received`` server → client."""

    sent: int = 0
    received: int = 0
    connections: int = 0

    @property
    def total(self) -> int:
        return self.sent + self.received

    def __sub__(self, other: Traffic) -> Traffic:
        return Traffic(self.sent - other.sent, self.received - other.received,
                       self.connections - other.connections)


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost``."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class WireCounter:
    """A byte-counting TCP proxy on 127.0.0.1 in front of one loopback server; thread-safe."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1",
                 listen_host: str = "127.0.0.1") -> None:
        if not (is_loopback(target_host) and is_loopback(listen_host)):
            raise ValueError(
                f"WireCounter forwards between loopback addresses only; got listen "
                f"{listen_host!r}, target {target_host!r}"
            )
        self.target = (target_host, int(target_port))
        self.listen_host = listen_host
        self._lock = threading.Lock()
        self._sent = self._received = self._connections = 0
        self._last_activity = time.monotonic()
        self._listener: socket.socket | None = None
        self._sockets: set[socket.socket] = set()
        self._half_done: set[frozenset[socket.socket]] = set()
        self._threads: list[threading.Thread] = []
        self._closing = threading.Event()

    # -- what callers use -----------------------------------------------------------------------
    @property
    def port(self) -> int:
        """The port the proxy listens on (connect clients here)."""
        if self._listener is None:
            raise RuntimeError("the WireCounter is not started: use it as a context manager")
        return self._listener.getsockname()[1]

    @property
    def address(self) -> str:
        """``host:port`` to give a client (e.g. a gRPC target)."""
        return f"{self.listen_host}:{self.port}"

    def counts(self) -> Traffic:
        """The bytes and connections counted so far (since the start or the last ``reset``)."""
        with self._lock:
            return Traffic(self._sent, self._received, self._connections)

    def reset(self) -> Traffic:
        """Start counting from zero again; return the counts until now."""
        with self._lock:
            before = Traffic(self._sent, self._received, self._connections)
            self._sent = self._received = self._connections = 0
            return before

    def wait_quiet(self, quiet_s: float = 0.1, timeout_s: float = 5.0) -> Traffic:
        """Wait until no byte has passed for ``quiet_s`` (at most ``timeout_s``); the counts."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                idle = time.monotonic() - self._last_activity
            if idle >= quiet_s:
                break
            time.sleep(min(quiet_s - idle, max(deadline - time.monotonic(), 0)) + 0.001)
        return self.counts()

    # -- life cycle -----------------------------------------------------------------------------
    def start(self) -> WireCounter:
        listener = socket.socket(socket.AF_INET6 if ":" in self.listen_host else socket.AF_INET)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.listen_host, 0))
        listener.listen(512)
        self._listener = listener
        self._spawn(self._accept_loop, name=f"wire-accept-{self.port}")
        return self

    def close(self) -> None:
        """Stop accepting, close every connection and wait for the proxy's threads to end."""
        self._closing.set()
        if self._listener is not None:
            _shutdown(self._listener)
            self._listener.close()
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            _shutdown(sock)
            sock.close()
        for thread in list(self._threads):
            if thread is not threading.current_thread():
                thread.join(timeout=5)

    def __enter__(self) -> WireCounter:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the proxy ------------------------------------------------------------------------------
    def _spawn(self, target, *args, name: str) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)
        thread.start()

    def _accept_loop(self) -> None:
        while not self._closing.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # the listener was closed
            try:
                upstream = socket.create_connection(self.target, timeout=10)
                upstream.settimeout(None)
            except OSError:
                client.close()  # the server is not there: the client sees the connection drop
                continue
            for sock in (client, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                if self._closing.is_set():
                    client.close()
                    upstream.close()
                    return
                self._connections += 1
                self._last_activity = time.monotonic()
                self._sockets.update((client, upstream))
            self._spawn(self._pump, client, upstream, True, name="wire-up")
            self._spawn(self._pump, upstream, client, False, name="wire-down")

    def _pump(self, source: socket.socket, sink: socket.socket, upstream: bool) -> None:
        """Copy ``source`` to ``sink`` until EOF, counting; then half-close ``sink``.

        A reset ends both directions at once (the other pump's ``recv`` then returns).
        """
        try:
            while True:
                data = source.recv(CHUNK)
                if not data:
                    break
                with self._lock:
                    if upstream:
                        self._sent += len(data)
                    else:
                        self._received += len(data)
                    self._last_activity = time.monotonic()
                sink.sendall(data)
            try:
                sink.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        except OSError:
            _shutdown(source)
            _shutdown(sink)
        self._release(source, sink)

    def _release(self, source: socket.socket, sink: socket.socket) -> None:
        """Close a pair once both directions ended (the second pump to finish closes both)."""
        pair = frozenset((source, sink))
        with self._lock:
            if pair not in self._half_done:
                self._half_done.add(pair)
                return
            self._half_done.discard(pair)
            self._sockets.difference_update(pair)
        for sock in pair:
            sock.close()


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
