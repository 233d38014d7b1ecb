"""One call on the wire: the bytes of a real gRPC call and a real REST call, taken apart.

``record_calls`` puts a one-connection recording proxy between a client and TorchServe, makes
two calls on that connection, and keeps every byte in each direction. ``http2_frames`` splits
a recording into HTTP/2 frames (a 9-byte header: length, type, flags, stream) and decodes their
header blocks with HPACK (the ``hpack`` package); ``http1_messages`` splits a REST recording
into requests or responses (head and body). The second call shows what HPACK's table saves:
headers already sent on the connection go as a one-byte index.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
FRAME_TYPES = {0: "DATA", 1: "HEADERS", 2: "PRIORITY", 3: "RST_STREAM", 4: "SETTINGS",
               5: "PUSH_PROMISE", 6: "PING", 7: "GOAWAY", 8: "WINDOW_UPDATE", 9: "CONTINUATION"}
#: Header values shown only by their length (the token is a secret, even an expiring one).
SECRET_HEADERS = ("authorization",)


@dataclass
class Recording:
    """Every byte one connection carried: client → server and server → client."""

    sent: bytearray = field(default_factory=bytearray)
    received: bytearray = field(default_factory=bytearray)


def record_calls(target_port: int, make_calls: Callable[[int], None]) -> Recording:
    """Forward one connection from a free loopback port to ``target_port``, keeping its bytes.

    ``make_calls(proxy_port)`` opens exactly one connection to the proxy and makes its calls.
    """
    recording = Recording()
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    threads: list[threading.Thread] = []

    def pump(source: socket.socket, sink: socket.socket, into: bytearray) -> None:
        try:
            while data := source.recv(65536):
                into += data
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def accept() -> None:
        try:
            client, _ = listener.accept()
        except OSError:
            return
        upstream = socket.create_connection(("127.0.0.1", target_port))
        for source, sink, into in ((client, upstream, recording.sent),
                                   (upstream, client, recording.received)):
            thread = threading.Thread(target=pump, args=(source, sink, into), daemon=True)
            thread.start()
            threads.append(thread)

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    try:
        make_calls(port)
    finally:
        listener.close()
        acceptor.join(timeout=5)
        for thread in threads:
            thread.join(timeout=5)
    return recording


def http2_frames(stream: bytes) -> list[dict]:
    """The HTTP/2 frames of one direction, header blocks decoded (secrets shown by length)."""
    from hpack import Decoder

    decoder = Decoder()
    position = len(PREFACE) if stream.startswith(PREFACE) else 0
    frames = []
    while position + 9 <= len(stream):
        length = int.from_bytes(stream[position:position + 3], "big")
        kind, flags = stream[position + 3], stream[position + 4]
        stream_id = int.from_bytes(stream[position + 5:position + 9], "big") & 0x7FFFFFFF
        payload = stream[position + 9:position + 9 + length]
        position += 9 + length
        frame = {"type": FRAME_TYPES.get(kind, str(kind)), "stream": stream_id,
                 "bytes": 9 + length, "flags": flags}
        if kind in (1, 9):  # HEADERS, CONTINUATION
            block = payload
            if kind == 1 and flags & 0x8:  # PADDED
                block = block[1:len(block) - block[0]]
            if kind == 1 and flags & 0x20:  # PRIORITY
                block = block[5:]
            frame["headers"] = [_shown(name, value)
                                for name, value in decoder.decode(bytes(block), raw=False)]
            frame["end_stream"] = bool(flags & 0x1)
        elif kind == 0 and length >= 5:  # DATA: gRPC's 5-byte prefix, then the message
            frame["message_bytes"] = int.from_bytes(payload[1:5], "big")
        frames.append(frame)
    return frames


def _shown(name: str, value: str) -> tuple[str, str]:
    if name.lower() in SECRET_HEADERS:
        scheme, _, secret = value.partition(" ")
        return name, f"{scheme} <{len(secret)} characters>"
    return name, value


def http1_messages(stream: bytes) -> list[dict]:
    """HTTP/1.1 requests or responses, one after another: head lines and body size."""
    messages, position = [], 0
    while position < len(stream):
        end = stream.find(b"\r\n\r\n", position)
        if end < 0:
            break
        head = stream[position:end + 4]
        lines = head.decode("latin-1").split("\r\n")[:-2]
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        shown = [lines[0]] + [": ".join(_shown(*(part.strip() for part in line.split(":", 1))))
                              for line in lines[1:]]
        messages.append({"first_line": lines[0], "headers": shown[1:],
                         "head_bytes": len(head), "body_bytes": length,
                         "bytes": len(head) + length})
        position = end + 4 + length
    return messages


def grpc_call_on_wire(recording: Recording, call: int = 1) -> dict:
    """The frames of the ``call``-th call (1 or 2) and the connection's own frames."""
    sent, received = http2_frames(bytes(recording.sent)), http2_frames(bytes(recording.received))
    streams = sorted({f["stream"] for f in sent if f["stream"]})
    stream = streams[call - 1]
    return {
        "stream": stream,
        "request": [f for f in sent if f["stream"] == stream],
        "response": [f for f in received if f["stream"] == stream],
        "connection_bytes": {
            "sent": len(PREFACE) + sum(f["bytes"] for f in sent if not f["stream"]),
            "received": sum(f["bytes"] for f in received if not f["stream"])},
        "calls": len(streams),
    }


def rest_call_on_wire(recording: Recording, call: int = 1) -> dict:
    requests = http1_messages(bytes(recording.sent))
    responses = http1_messages(bytes(recording.received))
    return {"request": requests[call - 1], "response": responses[call - 1],
            "calls": len(requests)}
