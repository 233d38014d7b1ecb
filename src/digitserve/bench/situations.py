"""The situations where gRPC and REST may differ, each measured on a running ``BenchServer``.

- ``connection_reuse``: one caller; gRPC on one channel or a new channel per call, REST kept
  alive or on a new connection per call (plaintext, or TLS on a TLS server).
- ``many_callers``: 64 or 256 calls in flight from asynchronous clients (``load_async``).
- ``deadlines``: calls whose deadline is shorter than the batch delay: what the caller sees,
  and whether TorchServe's worker still runs them (counted from its logs).
- ``payload``: the same digit padded to larger PNGs; ``encoding``: the 784 pixels as a typed
  Open Inference Protocol tensor (gRPC) against a JSON list of pixel rows (REST).

Each returns plain dicts (JSON-ready): the analysis module turns them into verdicts.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Sequence

import grpc
import numpy as np

from digitserve import config
from digitserve.bench import load, load_async, serverlogs
from digitserve.bench.floor import padded_png
from digitserve.bench.servers import BenchServer
from digitserve.bench.settings import BenchSettings
from digitserve.client import DigitClient
from digitserve.grpc_stubs import open_inference_grpc_pb2 as oip_pb2
from digitserve.oip import INPUT_NAME, OipClient
from digitserve.preprocessing import digit_from_payload

#: Calls sent through the byte-counting proxy to measure the bytes of one call.
WIRE_CALLS = 20


def _wire_counter():
    """``digitserve.wire.WireCounter``, or None where this checkout does not have it yet."""
    try:
        from digitserve.wire import WireCounter
    except ImportError:
        return None
    return WireCounter


def bytes_per_call(port: int, call_through: Callable[[int], None], calls: int = WIRE_CALLS
                   ) -> dict | None:
    """Bytes on the wire per call (both directions) and connections opened, through a proxy.

    ``call_through(proxy_port)`` makes ``calls`` calls to the proxy. The first call of a
    connection also pays its set-up, so one untimed call goes first and is not counted.
    """
    counter = _wire_counter()
    if counter is None:
        return None
    with counter(port) as wire:
        call_through(wire.port, 1)
        wire.wait_quiet()
        wire.reset()
        call_through(wire.port, calls)
        traffic = wire.wait_quiet()
    return {"sent_per_call": round(traffic.sent / calls, 1),
            "received_per_call": round(traffic.received / calls, 1),
            "bytes_per_call": round(traffic.total / calls, 1),
            "connections": traffic.connections}


def _grpc_through(server: BenchServer, image: bytes) -> Callable[[int, int], None]:
    def run(port: int, calls: int) -> None:
        target = f"{config.HOST}:{port}"
        tls = server.tls_cert
        with DigitClient(target, target, key_file=server.ts.key_file, tls_cert=tls) as client:
            for _ in range(calls):
                client.predict(image)
    return run


def _rest_through(server: BenchServer, body: bytes, keep_alive: bool = True,
                  content_type: str = "application/octet-stream") -> Callable[[int, int], None]:
    def run(port: int, calls: int) -> None:
        caller = load.RestCaller(port, server.key, keep_alive=keep_alive,
                                 tls_cert=server.tls_cert, content_type=content_type)
        try:
            for _ in range(calls):
                caller.answer(body)
        finally:
            caller.close()
    return run


def connection_reuse(server: BenchServer, payloads: Sequence[bytes], expected: Sequence[int],
                     requests: int) -> dict:
    """One caller, four ways of connecting; TorchServe's own timings for the kept ones."""
    variants: dict[str, Callable[[], load.Caller]] = {
        "grpc_channel": lambda: server.grpc_call,
        "rest_keep_alive": lambda: load.RestCaller(server.http_port, server.key,
                                                   tls_cert=server.tls_cert),
        "grpc_new_channel": lambda: load.NewChannelCaller(server.run_dir),
        "rest_new_connection": lambda: load.RestCaller(server.http_port, server.key,
                                                       keep_alive=False,
                                                       tls_cert=server.tls_cert),
    }
    out = {"tls": server.config.tls, "server": server.config.label}
    for name, make in variants.items():
        window = server.window()
        measured = load.drive(make, payloads, expected, requests, 1, 5, server.server_cpu)
        out[name] = {**measured.summary(), "samples_ms": _samples(measured)}
        if name in ("grpc_channel", "rest_keep_alive"):
            out[name]["server_log"] = serverlogs.timings(window)
    image = payloads[0]
    out["wire"] = {
        "grpc_channel": bytes_per_call(server.grpc_port, _grpc_through(server, image)),
        "rest_keep_alive": bytes_per_call(server.http_port, _rest_through(server, image)),
        "rest_new_connection": bytes_per_call(server.http_port,
                                              _rest_through(server, image, keep_alive=False)),
    }
    return out


def many_callers(server: BenchServer, settings: BenchSettings, payloads: Sequence[bytes],
                 expected: Sequence[int]) -> list[dict]:
    """For each number of calls in flight: one grpc.aio channel against an aiohttp pool."""
    rows = []
    for in_flight in settings.in_flight:
        requests = max(settings.load_requests, 2 * in_flight)
        row = {"in_flight": in_flight, "requests": requests}
        for mode, run, port in (("grpc", load_async.grpc_many, server.grpc_port),
                                ("rest", load_async.rest_many, server.http_port)):
            measured, connections = run(port, server.key, payloads, expected, requests,
                                        in_flight, server.tls_cert, server.server_cpu)
            row[mode] = {**measured.summary(), "connections": connections}
        rows.append(row)
    return rows


def deadlines(server: BenchServer, settings: BenchSettings, image: bytes) -> dict:
    """Half a batch of calls at once, with a deadline shorter than the server's batch delay.

    Too few to fill a batch of ``batch_size``, the calls wait ``deadline_batch_delay_ms`` for
    company; each gives up after ``deadline_ms``. Then the worker's answers are counted from
    TorchServe's log: how many of the abandoned calls it still ran.
    """
    deadline_s = settings.deadline_ms / 1000
    calls = max(1, settings.batch_size // 2)
    out = {"deadline_ms": settings.deadline_ms, "calls": calls,
           "batch_delay_ms": settings.deadline_batch_delay_ms}

    def grpc_call() -> str:
        try:
            server.grpc_call(image, timeout_s=deadline_s)
            return "OK"
        except grpc.RpcError as err:
            return err.code().name

    def rest_call() -> str:
        caller = load.RestCaller(server.http_port, server.key, keep_alive=False,
                                 timeout_s=deadline_s, tls_cert=server.tls_cert)
        try:
            caller.answer(image)
            return "OK"
        except TimeoutError:
            return "client timeout"
        finally:
            caller.close()

    for mode, call in (("grpc", grpc_call), ("rest", rest_call)):
        window = server.window()
        outcomes, times = _at_once(call, calls)
        # Wait for the batch to be dispatched and answered (and the log to be written).
        time.sleep(settings.deadline_batch_delay_ms / 1000 + 1.5)
        answers = serverlogs.worker_answers(window)
        failed = [t for t, outcome in zip(times, outcomes, strict=True) if outcome != "OK"]
        out[mode] = {"outcomes": sorted(set(outcomes)), "expired": len(failed),
                     "ms_to_error_p50": (round(float(np.median(failed)) * 1000, 1)
                                         if failed else None),
                     "worker_ran": answers["answered"],
                     "answered_after_cancel": answers["answered_after_cancel"]}
    return out


def _at_once(call: Callable[[], str], n: int) -> tuple[list[str], list[float]]:
    """``n`` calls started together from threads: their outcomes and times."""
    barrier = threading.Barrier(n)
    outcomes, times = [""] * n, [0.0] * n

    def one(slot: int) -> None:
        barrier.wait()
        began = time.perf_counter()
        outcomes[slot] = call()
        times[slot] = time.perf_counter() - began

    threads = [threading.Thread(target=one, args=(slot,)) for slot in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outcomes, times


def payload(server: BenchServer, settings: BenchSettings, payloads: Sequence[bytes],
            expected: Sequence[int]) -> list[dict]:
    """gRPC and REST (kept alive), one caller, the same digits padded to each size."""
    rows = []
    for size in (0, *settings.payload_sizes):  # 0: the PNGs as they are
        padded = [padded_png(p, size) for p in payloads]
        for mode, make in server.callers().items():
            measured = load.drive(make, padded, expected, settings.payload_requests, 1, 3,
                                  server.server_cpu)
            rows.append({"mode": mode, "payload_bytes": int(np.mean([len(p) for p in padded])),
                         **measured.summary()})
    return rows


def encoding(server: BenchServer, settings: BenchSettings, payloads: Sequence[bytes],
             expected: Sequence[int]) -> dict:
    """784 pixels per call: a typed OIP tensor (UINT8) over gRPC, a JSON pixel list over REST.

    TorchServe's REST API takes no typed tensor, so a JSON list of pixel rows is what a REST
    client sends when it has pixels rather than an image file.
    """
    pixels = [digit_from_payload(p) for p in payloads]  # the 28×28 digit of each PNG
    as_json = [json.dumps(p.tolist()).encode() for p in pixels]
    oip = OipClient(server.client)
    grpc_measured = load.drive(lambda: (lambda digit: oip.infer(digit)["digit"]), pixels,
                               expected, settings.encoding_requests, 1, 3, server.server_cpu)
    rest_measured = load.drive(
        lambda: load.RestCaller(server.http_port, server.key, content_type="application/json",
                                tls_cert=server.tls_cert),
        as_json, expected, settings.encoding_requests, 1, 3, server.server_cpu)

    def typed_through(port: int, calls: int) -> None:
        target = f"{config.HOST}:{port}"
        with OipClient(DigitClient(target, target, key_file=server.ts.key_file,
                                   tls_cert=server.tls_cert)) as client:
            for _ in range(calls):
                client.infer(pixels[0])

    message = oip_pb2.ModelInferRequest(
        model_name=config.MODEL_NAME,
        inputs=[oip_pb2.ModelInferRequest.InferInputTensor(
            name=INPUT_NAME, datatype="UINT8", shape=list(pixels[0].shape),
            contents=oip_pb2.InferTensorContents(uint_contents=pixels[0].ravel().tolist()))])
    return {
        "grpc": {**grpc_measured.summary(), "what": "OIP ModelInfer, UINT8 [28, 28] tensor",
                 "body_bytes": message.ByteSize() + 5},
        "rest": {**rest_measured.summary(), "what": "POST a JSON list of 28 rows of 28 pixels",
                 "body_bytes": len(as_json[0])},
        "wire": {"grpc": bytes_per_call(server.grpc_port, typed_through),
                 "rest": bytes_per_call(server.http_port, _rest_through(
                     server, as_json[0], content_type="application/json"))},
    }


def _samples(measured: load.Measurement, keep: int = 400) -> list[float]:
    """Up to ``keep`` latencies in milliseconds, in the order measured (for the figures)."""
    return [round(s * 1000, 3) for s in measured.latencies_s[:keep]]
