"""wire: the byte-counting loopback proxy counts every byte and connection, exactly."""

from __future__ import annotations

import socket
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from digitserve.wire import Traffic, WireCounter

pytestmark = pytest.mark.unit


class EchoServer:
    """A loopback TCP server that answers each message with ``reply_factor`` times its bytes."""

    def __init__(self, reply_factor: int = 1) -> None:
        self.reply_factor = reply_factor
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.threads: list[threading.Thread] = []
        self.accepted = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.accepted += 1
            thread = threading.Thread(target=self._echo, args=(conn,), daemon=True)
            self.threads.append(thread)
            thread.start()

    def _echo(self, conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data * self.reply_factor)

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def echo():
    server = EchoServer()
    yield server
    server.close()


def exchange(port: int, message: bytes, expect: int) -> bytes:
    """Send ``message`` on a new connection, read ``expect`` bytes back, close."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(message)
        got = b""
        while len(got) < expect:
            chunk = sock.recv(65536)
            assert chunk, "the proxy closed the connection early"
            got += chunk
    return got


def test_counts_each_direction_exactly() -> None:
    server = EchoServer(reply_factor=3)
    try:
        with WireCounter(server.port) as wire:
            got = exchange(wire.port, b"x" * 1000, 3000)
            assert got == b"x" * 3000
            assert wire.counts() == Traffic(sent=1000, received=3000, connections=1)
            assert wire.counts().total == 4000
    finally:
        server.close()


def test_large_transfer_arrives_intact_and_counted(echo: EchoServer) -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB, larger than one socket buffer
    with WireCounter(echo.port) as wire:
        assert exchange(wire.port, payload, len(payload)) == payload
        assert wire.wait_quiet() == Traffic(len(payload), len(payload), 1)


def test_concurrent_connections_are_all_counted(echo: EchoServer) -> None:
    sizes = [100 + 37 * i for i in range(64)]
    with WireCounter(echo.port) as wire:
        with ThreadPoolExecutor(max_workers=16) as pool:
            replies = list(pool.map(lambda n: exchange(wire.port, b"a" * n, n), sizes))
        assert [len(r) for r in replies] == sizes
        assert wire.wait_quiet() == Traffic(sum(sizes), sum(sizes), len(sizes))
    assert echo.accepted == len(sizes)


def test_many_messages_on_one_connection(echo: EchoServer) -> None:
    with WireCounter(echo.port) as wire, socket.create_connection(("127.0.0.1", wire.port)) as s:
        for n in (1, 10, 100, 1000):
            s.sendall(b"m" * n)
            got = b""
            while len(got) < n:
                got += s.recv(65536)
        assert wire.counts() == Traffic(1111, 1111, 1)


def test_reset_and_difference(echo: EchoServer) -> None:
    with WireCounter(echo.port) as wire:
        exchange(wire.port, b"1234", 4)
        before = wire.wait_quiet()
        exchange(wire.port, b"123456", 6)
        assert wire.wait_quiet() - before == Traffic(6, 6, 1)
        assert wire.reset() == Traffic(10, 10, 2)
        assert wire.counts() == Traffic()


def test_no_thread_left_after_close(echo: EchoServer) -> None:
    before = {t for t in threading.enumerate() if t.name.startswith("wire-")}
    with WireCounter(echo.port) as wire:
        held = socket.create_connection(("127.0.0.1", wire.port))  # still open at close
        exchange(wire.port, b"abc", 3)
    held.close()
    left = {t for t in threading.enumerate() if t.name.startswith("wire-")} - before
    assert not left, left
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", wire.port), timeout=1).close()


def test_server_gone_drops_the_client() -> None:
    unused = socket.create_server(("127.0.0.1", 0))
    port = unused.getsockname()[1]
    unused.close()  # nothing listens there now
    with WireCounter(port) as wire, socket.create_connection(("127.0.0.1", wire.port)) as s:
        s.settimeout(5)
        assert s.recv(10) == b""  # closed by the proxy
        assert wire.counts().connections == 0


def test_refuses_addresses_off_loopback() -> None:
    with pytest.raises(ValueError, match="loopback"):
        WireCounter(80, target_host="10.0.0.1")
    with pytest.raises(ValueError, match="loopback"):
        WireCounter(80, listen_host="0.0.0.0")


def test_port_before_start_says_how() -> None:
    with pytest.raises(RuntimeError, match="context manager"):
        _ = WireCounter(80).port


def test_grpc_calls_share_one_counted_connection() -> None:
    """Many gRPC calls on one channel: one connection, and at least every payload byte."""
    import grpc

    handler = grpc.method_handlers_generic_handler("test.Echo", {
        "Echo": grpc.unary_unary_rpc_method_handler(lambda request, context: request * 2),
    })
    server = grpc.server(ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with WireCounter(port) as wire, grpc.insecure_channel(wire.address) as channel:
            echo = channel.unary_unary("/test.Echo/Echo")
            for _ in range(10):
                assert echo(b"z" * 500, timeout=10) == b"z" * 1000
            traffic = wire.wait_quiet()
        assert traffic.connections == 1
        assert traffic.sent > 10 * 500 and traffic.received > 10 * 1000
    finally:
        server.stop(grace=None)
