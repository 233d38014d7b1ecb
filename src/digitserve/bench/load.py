"""Synchronous load: callers for gRPC and REST, and ``drive``, which times them from threads.

A caller is any callable taking the image bytes and returning the predicted digit. gRPC callers
share one ``DigitClient`` (one channel, one HTTP/2 connection) unless they are told to open a
new one per call; each REST caller holds its own HTTP/1.1 connection, kept alive or opened anew
for every call, in plaintext or over TLS.
"""

from __future__ import annotations

import http.client
import itertools
import json
import math
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil

from digitserve import config
from digitserve.bench.serverlogs import trimmed_mean
from digitserve.client import DigitClient, ServingError

Caller = Callable[[bytes], int]


@dataclass
class Measurement:
    """The timed part of one measurement: per-call latencies and the wall time of them all."""

    latencies_s: list[float]
    wall_s: float
    images_per_call: int = 1
    errors: int = 0
    mismatches: int = 0
    first_error: str = ""
    #: CPU seconds of the timed part in this process (the client, or the floor) and in the
    #: server's processes (Java frontend and Python workers): steadier than wall time on a
    #: busy machine, and what a server really costs.
    client_cpu_s: float | None = None
    server_cpu_s: float | None = None

    def summary(self) -> dict:
        ms = np.asarray(self.latencies_s) * 1000
        p50, p90, p99 = (float(np.percentile(ms, q)) if len(ms) else math.nan
                         for q in (50, 90, 99))
        calls = len(self.latencies_s) + self.errors
        images = max(calls * self.images_per_call, 1)
        return {
            "requests": calls * self.images_per_call,
            "errors": self.errors,
            "mismatches": self.mismatches,
            "p50_ms": round(p50, 3),
            "p90_ms": round(p90, 3),
            "p99_ms": round(p99, 3),
            "mean_ms": round(float(ms.mean()), 3) if len(ms) else math.nan,
            "trimmed_mean_ms": trimmed_mean(ms.tolist()),
            "throughput_rps": (round(len(ms) * self.images_per_call / self.wall_s, 1)
                               if self.wall_s else math.nan),
            "client_cpu_ms": (None if self.client_cpu_s is None
                              else round(self.client_cpu_s * 1000 / images, 3)),
            "server_cpu_ms": (None if self.server_cpu_s is None
                              else round(self.server_cpu_s * 1000 / images, 3)),
            "first_error": self.first_error,
        }


class RestCaller:
    """``POST /predictions/<model>`` with the image as the body, on one HTTP/1.1 connection.

    ``keep_alive=False`` opens a new connection (and, over TLS, a new handshake) for every
    call, as ``requests.post`` without a session does; ``tls_cert`` trusts that certificate
    and speaks HTTPS.
    """

    def __init__(self, port: int, key: str, keep_alive: bool = True,
                 tls_cert: Path | None = None, timeout_s: float = 60.0,
                 content_type: str = "application/octet-stream") -> None:
        self.port, self.keep_alive, self.timeout_s = port, keep_alive, timeout_s
        self.context = (ssl.create_default_context(cafile=str(tls_cert)) if tls_cert else None)
        self.path = f"/predictions/{config.MODEL_NAME}"
        self.headers = {"Content-Type": content_type, "Authorization": f"Bearer {key}"}
        if not keep_alive:
            self.headers["Connection"] = "close"
        self.connection: http.client.HTTPConnection | None = None
        self.connections = 0

    def _connect(self) -> http.client.HTTPConnection:
        self.connections += 1
        if self.context is not None:
            return http.client.HTTPSConnection(config.HOST, self.port, timeout=self.timeout_s,
                                               context=self.context)
        return http.client.HTTPConnection(config.HOST, self.port, timeout=self.timeout_s)

    def answer(self, body: bytes) -> dict:
        """One call; the JSON answer."""
        for attempt in (1, 2):
            if self.connection is None:
                self.connection = self._connect()
            try:
                self.connection.request("POST", self.path, body=body, headers=self.headers)
                response = self.connection.getresponse()
                text = response.read()
                break
            except (OSError, http.client.HTTPException) as err:
                # A connection the server closed, or one left mid-answer by a timeout, cannot
                # carry the next request: drop it (and retry once when it had been closed).
                self.close()
                closed = isinstance(err, (http.client.RemoteDisconnected, ConnectionResetError,
                                          BrokenPipeError))
                if attempt == 2 or not closed:
                    raise
        if not self.keep_alive:
            self.close()
        if response.status != 200:
            raise ServingError(f"REST {response.status}: {text[:200].decode(errors='replace')}")
        return json.loads(text)

    def __call__(self, body: bytes) -> int:
        return self.answer(body)["digit"]

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()
            self.connection = None


class NewChannelCaller:
    """gRPC with a new ``DigitClient`` (a new channel: TCP, HTTP/2, maybe TLS) for every call."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir

    def __call__(self, image: bytes) -> int:
        with DigitClient.for_run_dir(self.run_dir, deadline_s=60.0) as client:
            return client.predict(image).digit


def shared_client_caller(client: DigitClient) -> Caller:
    """gRPC Predictions on a client every caller thread shares (one channel)."""
    return lambda image: client.predict(image).digit


def drive(make_caller: Callable[[], Caller], payloads: Sequence[bytes],
          expected: Sequence[int], requests: int, concurrency: int = 1, warmup: int = 0,
          server_cpu: Callable[[], float] | None = None) -> Measurement:
    """``requests`` timed calls from ``concurrency`` threads, after untimed warm-up calls.

    Each thread makes its own caller, makes its share of the warm-up calls (at least one, so
    every connection is open), then all threads start the timed calls together and take the
    next image until ``requests`` are done. Throughput is timed calls over the wall time from
    that start to the last answer. ``server_cpu`` returns the server's CPU seconds so far.
    """
    warm_each = max(1, math.ceil(warmup / concurrency))
    counter = itertools.count()
    start = threading.Barrier(concurrency + 1, timeout=config.STARTUP_TIMEOUT_S)
    lock = threading.Lock()
    latencies: list[float] = []
    failures: list[str] = []
    mismatches = [0]

    def worker(slot: int) -> None:
        try:
            caller = make_caller()
        except Exception as err:  # noqa: BLE001 - reported by the main thread
            failures.append(f"could not make a caller: {type(err).__name__}: {err}")
            start.abort()
            return
        try:
            for i in range(warm_each):
                try:
                    caller(payloads[(slot * warm_each + i) % len(payloads)])
                except Exception as err:  # noqa: BLE001 - counted below, never hides a hang
                    with lock:
                        failures.append(f"warm-up: {type(err).__name__}: {err}")
            start.wait()
            mine = []
            while (index := next(counter)) < requests:
                image = index % len(payloads)
                began = time.perf_counter()
                try:
                    digit = caller(payloads[image])
                except Exception as err:  # noqa: BLE001 - a failed call is a figure too
                    with lock:
                        failures.append(f"{type(err).__name__}: {err}")
                    continue
                mine.append(time.perf_counter() - began)
                if digit != expected[image]:
                    with lock:
                        mismatches[0] += 1
            with lock:
                latencies.extend(mine)
        finally:
            getattr(caller, "close", lambda: None)()

    threads = [threading.Thread(target=worker, args=(slot,), daemon=True)
               for slot in range(concurrency)]
    for thread in threads:
        thread.start()
    try:
        start.wait()
    except threading.BrokenBarrierError:
        raise RuntimeError(f"the caller threads did not get ready: {failures[:1]}") from None
    began, cpu_began = time.perf_counter(), time.process_time()
    server_began = server_cpu() if server_cpu else None
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - began
    client_cpu = time.process_time() - cpu_began
    server_used = server_cpu() - server_began if server_cpu else None
    timed_failures = [f for f in failures if not f.startswith("warm-up")]
    return Measurement(latencies, wall, errors=len(timed_failures), mismatches=mismatches[0],
                       first_error=(failures or [""])[0], client_cpu_s=client_cpu,
                       server_cpu_s=server_used)


def server_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used so far by a TorchServe: its launcher, Java, workers."""
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.Error:
        return math.nan
    total = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total
