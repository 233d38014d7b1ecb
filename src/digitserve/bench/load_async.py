"""Asynchronous load: many calls in flight from one thread, over gRPC (``grpc.aio``) and REST.

gRPC keeps every call on one channel: one TCP connection, one HTTP/2 stream per call. REST
has no way to carry two calls at once on one HTTP/1.1 connection, so ``aiohttp`` keeps a pool
that grows to as many connections as calls in flight. Both clients are asynchronous, so that
neither side pays for a thread per call and the figures compare protocols, not client styles.

Why aiohttp and not httpx (also installed): at 64 calls in flight against a trivial local
server, httpx 0.28's pool spent about 5 ms of client CPU per call and aiohttp about 0.3 ms
(measured while writing this; REST would have lost for its client's sake alone).
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import psutil

from digitserve import config
from digitserve.bench.load import Measurement
from digitserve.client import CHANNEL_OPTIONS, Prediction, ServingError
from digitserve.grpc_stubs import inference_pb2, inference_pb2_grpc
from digitserve.ports import connections as process_connections

AsyncCall = Callable[[bytes], Awaitable[int]]


def run_async(coroutine_function: Callable[[], Awaitable], /):
    """Run a coroutine on its own event loop in another thread (a notebook already runs one)."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(lambda: asyncio.run(coroutine_function())).result()


def open_connections(port: int) -> int:
    """TCP connections this process holds to ``port`` on this machine right now (the client
    under test's, once those held before it started are subtracted)."""
    return sum(1 for c in process_connections(psutil.Process(), "tcp")
               if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED)


async def _drive(call: AsyncCall, payloads: Sequence[bytes], expected: Sequence[int],
                 requests: int, in_flight: int, port: int, held_before: int,
                 server_cpu: Callable[[], float] | None) -> tuple[Measurement, int]:
    """``in_flight`` tasks each warm up once, then share ``requests`` timed calls.

    Returns the figures and the connections the client opened (held at the end, less the
    ``held_before`` it started).
    """
    latencies: list[float] = []
    failures: list[str] = []
    mismatches = 0
    next_index = 0

    async def warm(slot: int) -> None:
        try:
            await call(payloads[slot % len(payloads)])
        except Exception as err:  # noqa: BLE001 - reported with the figures
            failures.append(f"warm-up: {type(err).__name__}: {err}")

    async def worker() -> None:
        nonlocal next_index, mismatches
        while next_index < requests:
            index = next_index
            next_index += 1
            image = index % len(payloads)
            began = time.perf_counter()
            try:
                digit = await call(payloads[image])
            except Exception as err:  # noqa: BLE001 - a failed call is a figure too
                failures.append(f"{type(err).__name__}: {err}")
                continue
            latencies.append(time.perf_counter() - began)
            mismatches += digit != expected[image]

    await asyncio.gather(*(warm(slot) for slot in range(in_flight)))
    warm_failures = len(failures)
    began, cpu_began = time.perf_counter(), time.process_time()
    server_began = server_cpu() if server_cpu else None
    await asyncio.gather(*(worker() for _ in range(in_flight)))
    wall = time.perf_counter() - began
    client_cpu = time.process_time() - cpu_began
    server_used = server_cpu() - server_began if server_cpu else None
    connections = open_connections(port) - held_before
    return Measurement(latencies, wall, errors=len(failures) - warm_failures,
                       mismatches=mismatches, first_error=(failures or [""])[0],
                       client_cpu_s=client_cpu, server_cpu_s=server_used), connections


def grpc_many(port: int, key: str, payloads: Sequence[bytes], expected: Sequence[int],
              requests: int, in_flight: int, tls_cert: Path | None = None,
              server_cpu: Callable[[], float] | None = None) -> tuple[Measurement, int]:
    """``in_flight`` concurrent Predictions on one ``grpc.aio`` channel; (figures, connections)."""
    metadata = (("authorization", f"Bearer {key}"),)
    target = f"{config.HOST}:{port}"

    async def main() -> tuple[Measurement, int]:
        held_before = open_connections(port)
        if tls_cert is None:
            channel = grpc.aio.insecure_channel(target, CHANNEL_OPTIONS)
        else:
            credentials = grpc.ssl_channel_credentials(Path(tls_cert).read_bytes())
            channel = grpc.aio.secure_channel(target, credentials, CHANNEL_OPTIONS)
        stub = inference_pb2_grpc.InferenceAPIsServiceStub(channel)

        async def call(image: bytes) -> int:
            request = inference_pb2.PredictionsRequest(model_name=config.MODEL_NAME,
                                                       input={"data": image})
            reply = await stub.Predictions(request, timeout=60.0, metadata=metadata)
            return Prediction.from_json(reply.prediction).digit

        try:
            return await _drive(call, payloads, expected, requests, in_flight, port,
                                held_before, server_cpu)
        finally:
            await channel.close()

    return run_async(main)


def rest_many(port: int, key: str, payloads: Sequence[bytes], expected: Sequence[int],
              requests: int, in_flight: int, tls_cert: Path | None = None,
              server_cpu: Callable[[], float] | None = None) -> tuple[Measurement, int]:
    """``in_flight`` concurrent POSTs from an aiohttp pool of up to ``in_flight`` connections."""
    import aiohttp

    scheme = "https" if tls_cert else "http"
    url = f"{scheme}://{config.HOST}:{port}/predictions/{config.MODEL_NAME}"
    headers = {"Content-Type": "application/octet-stream", "Authorization": f"Bearer {key}"}
    context = ssl.create_default_context(cafile=str(tls_cert)) if tls_cert else False

    async def main() -> tuple[Measurement, int]:
        held_before = open_connections(port)
        connector = aiohttp.TCPConnector(limit=in_flight, ssl=context)
        timeout = aiohttp.ClientTimeout(total=60.0)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            async def call(image: bytes) -> int:
                async with session.post(url, data=image, headers=headers) as response:
                    body = await response.read()
                    if response.status != 200:
                        raise ServingError(f"REST {response.status}: {body[:200]!r}")
                    return Prediction.from_json(body).digit

            return await _drive(call, payloads, expected, requests, in_flight, port,
                                held_before, server_cpu)

    return run_async(main)
