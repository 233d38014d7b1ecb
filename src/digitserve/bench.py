"""Measure the serving path against the in-process floor, in one run, on the same images.

What one run measures (``run_benchmark``), warm-up requests excluded everywhere:

1. **The floor**, in this process: the kit's preprocessing (``digit_from_payload`` on the PNG
   bytes, then ``to_model_input``) and a forward pass of the weights inside the .mar, as the
   handler does it (``model.for_serving``: channels_last, traced and frozen TorchScript;
   ``inference_mode``, softmax), one image at a time and in
   batches of 8. No server can be faster than this on the same CPU.
2. For each server configuration (batching off and on × 1 and 2 workers, each a fresh
   TorchServe, stopped before the next starts): gRPC unary, REST (``POST /predictions``) and
   gRPC server streaming, at 1, 4 and 16 concurrent callers. One caller is the sequential case.
   gRPC callers are threads sharing one ``DigitClient`` (one channel); each REST caller keeps
   its own HTTP/1.1 connection alive. Cold start is the time from ``TorchServe.start()`` to
   the first successful gRPC prediction.
3. Payload size: the same digit padded to larger PNGs, gRPC against REST, one caller.
4. Levers (the full setting): torch threads × workers and ``OMP_WAIT_POLICY``, TorchServe's
   per-request logging (``metrics_mode``, log4j2 configurations, ``async_logging``), batch
   delay, client channel reuse, and, in-process, ``inference_mode``, ``channels_last``,
   TorchScript and ``torch.compile``.

Every latency is p50/p90/p99 in milliseconds and every rate is requests (images) per second,
with ratios to the floor of the same run. Results go to ``build/bench/``: ``results.json``
(every figure, the settings, the machine and the raw latencies), ``results.csv`` (one row per
measurement), ``results.md`` and three PNG figures.

Timings are only as quiet as the machine: the load average at the start and end of the run is
recorded beside the numbers.
"""

from __future__ import annotations

import copy
import csv
import http.client
import io
import itertools
import json
import math
import os
import platform
import shutil
import threading
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import psutil
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure

from digitserve import config, data, preprocessing, synthetic
from digitserve.client import DigitClient, ServingError, read_key
from digitserve.model import DigitCNN, for_serving
from digitserve.plots import save_figure
from digitserve.progress import HEADLESS
from digitserve.progress import progress as progress_bar
from digitserve.server import ModelSpec, ServerSettings, TorchServe, config_properties, free_ports

BENCH_DIR = config.BUILD_DIR / "bench"
RESULTS_JSON = "results.json"
RESULTS_CSV = "results.csv"
RESULTS_MD = "results.md"
LATENCY_PNG = "latency.png"
THROUGHPUT_PNG = "throughput.png"
PAYLOAD_PNG = "payload.png"

GRPC, REST, STREAM, IN_PROCESS = "grpc", "rest", "grpc-stream", "in-process"
MODES = (GRPC, REST, STREAM)
#: How long a server may take to start before the run fails.
START_TIMEOUT_S = 300.0
#: The deadline of every call the benchmark makes (gRPC and REST): longer than the kit's
#: ``RPC_DEADLINE_S``, so that 16 callers queued on a slow, busy machine give slow figures
#: rather than errors.
CALL_DEADLINE_S = 60.0

#: A log4j2 configuration that keeps TorchServe's warnings and errors and drops what it writes
#: for every request: the access log, the worker's stdout (``MODEL_LOG``: "Backend received
#: inference at ..." and the ``[METRICS]`` lines), and the per-request metric logs. Beware: the
#: frontend logs everything a worker prints at INFO, so a handler's tracebacks go with it.
QUIET_LOG4J2 = """<?xml version="1.0" encoding="UTF-8"?>
<Configuration>
  <Appenders>
    <Console name="STDOUT" target="SYSTEM_OUT">
      <PatternLayout pattern="%d{ISO8601} [%-5p] %t %c - %m%n"/>
    </Console>
  </Appenders>
  <Loggers>
    <Logger name="ACCESS_LOG" level="off" additivity="false"/>
    <Logger name="MODEL_LOG" level="warn" additivity="false">
      <AppenderRef ref="STDOUT"/>
    </Logger>
    <Logger name="MODEL_METRICS" level="off" additivity="false"/>
    <Logger name="TS_METRICS" level="off" additivity="false"/>
    <Logger name="io.netty" level="error"/>
    <Logger name="org.apache" level="off"/>
    <Logger name="org.pytorch.serve" level="warn"/>
    <Root level="warn">
      <AppenderRef ref="STDOUT"/>
    </Root>
  </Loggers>
</Configuration>
"""

#: The log4j2 configuration proposed as the kit's default (with ``metrics_mode=prometheus``):
#: one access-log line and the worker's own output per request, startup and lifecycle events at
#: INFO, each written once; the frontend's per-request INFO/DEBUG lines and the metric logs go
#: (the metrics stay on the metrics port). The console gets warnings and errors only.
LEAN_LOG4J2 = """<?xml version="1.0" encoding="UTF-8"?>
<Configuration>
  <Appenders>
    <Console name="STDOUT" target="SYSTEM_OUT">
      <PatternLayout pattern="%d{ISO8601} [%-5p] %t %c - %m%n"/>
      <ThresholdFilter level="warn"/>
    </Console>
    <RollingFile name="access_log" fileName="${env:LOG_LOCATION:-logs}/access_log.log"
                 filePattern="${env:LOG_LOCATION:-logs}/access_log.%d{dd-MMM}.log.gz">
      <PatternLayout pattern="%d{ISO8601} - %m%n"/>
      <Policies><SizeBasedTriggeringPolicy size="100 MB"/></Policies>
      <DefaultRolloverStrategy max="5"/>
    </RollingFile>
    <RollingFile name="model_log" fileName="${env:LOG_LOCATION:-logs}/model_log.log"
                 filePattern="${env:LOG_LOCATION:-logs}/model_log.%d{dd-MMM}.log.gz">
      <PatternLayout pattern="%d{ISO8601} [%-5p] %t %c - %m%n"/>
      <Policies><SizeBasedTriggeringPolicy size="100 MB"/></Policies>
      <DefaultRolloverStrategy max="5"/>
    </RollingFile>
    <RollingFile name="ts_log" fileName="${env:LOG_LOCATION:-logs}/ts_log.log"
                 filePattern="${env:LOG_LOCATION:-logs}/ts_log.%d{dd-MMM}.log.gz">
      <PatternLayout pattern="%d{ISO8601} [%-5p] %t %c - %m%n"/>
      <Policies><SizeBasedTriggeringPolicy size="100 MB"/></Policies>
      <DefaultRolloverStrategy max="5"/>
    </RollingFile>
  </Appenders>
  <Loggers>
    <Logger name="ACCESS_LOG" level="info" additivity="false">
      <AppenderRef ref="access_log"/>
    </Logger>
    <Logger name="MODEL_LOG" level="info" additivity="false">
      <AppenderRef ref="model_log"/>
      <AppenderRef ref="STDOUT"/>
    </Logger>
    <Logger name="MODEL_METRICS" level="off" additivity="false"/>
    <Logger name="TS_METRICS" level="off" additivity="false"/>
    <Logger name="io.netty" level="error"/>
    <Logger name="org.apache" level="off"/>
    <Logger name="org.pytorch.serve" level="info" additivity="false">
      <AppenderRef ref="ts_log"/>
      <AppenderRef ref="STDOUT"/>
    </Logger>
    <Logger name="org.pytorch.serve.wlm.WorkerThread" level="warn"/>
    <Logger name="org.pytorch.serve.wlm.BatchAggregator" level="warn"/>
    <Logger name="org.pytorch.serve.wlm.WorkerLifeCycle" level="warn"/>
    <Logger name="org.pytorch.serve.job" level="warn"/>
    <Root level="info">
      <AppenderRef ref="ts_log"/>
      <AppenderRef ref="STDOUT"/>
    </Root>
  </Loggers>
</Configuration>
"""


@dataclass(frozen=True)
class ServerConfig:
    """One TorchServe to start fresh: workers, batching, torch threads and logging."""

    label: str
    workers: int = 1
    batch_size: int = 1
    max_batch_delay_ms: int = 5
    #: Torch (OpenMP) threads per worker (the kit's default is one).
    torch_threads: int = ServerSettings.torch_threads
    #: "default" (TorchServe's log4j2.xml), "quiet" (``QUIET_LOG4J2``), "lean" (``LEAN_LOG4J2``
    #: and ``metrics_mode=prometheus``), "async" (log4j's asynchronous loggers,
    #: ``async_logging=true``) or "prometheus" (``metrics_mode=prometheus`` alone: metrics kept
    #: for the metrics port instead of written to ts_metrics.log and model_metrics.log).
    logging: str = "default"
    #: OpenMP's ``OMP_WAIT_POLICY`` for the workers: None leaves libgomp's default (threads
    #: spin a while before they sleep), "PASSIVE" makes waiting threads sleep at once.
    omp_wait_policy: str | None = None

    @property
    def slug(self) -> str:
        wait = f"-{self.omp_wait_policy.lower()}" if self.omp_wait_policy else ""
        return (f"w{self.workers}-b{self.batch_size}-d{self.max_batch_delay_ms}-"
                f"t{self.torch_threads}-{self.logging}{wait}")


@dataclass(frozen=True)
class BenchSettings:
    """How much to measure. ``FULL`` for figures you report, ``QUICK`` for CI."""

    #: Timed requests per measurement, and untimed warm-up requests before each.
    requests: int = 1000
    warmup: int = 50
    #: Untimed requests of every mode sent to each new server before anything is measured: the
    #: Java frontend compiles its hot paths only after thousands of calls (JIT), and without
    #: this the first mode measured would pay for it.
    server_warmup: int = 1000
    concurrencies: tuple[int, ...] = (1, 4, 16)
    workers: tuple[int, ...] = (1, 2)
    #: Batching off (False) and on (True), each with every worker count.
    batching: tuple[bool, ...] = (False, True)
    #: Batching "on" means up to ``batch_size`` requests gathered within ``max_batch_delay_ms``.
    batch_size: int = 8
    max_batch_delay_ms: int = 5
    #: How many distinct MNIST test images are cycled through.
    images: int = 256
    #: Timed images in the in-process floor, at batch 1 (batch 8 uses as many images).
    floor_requests: int = 1000
    #: Payload sizes in bytes for the gRPC-vs-REST size sweep (the digit PNG padded to each).
    payload_sizes: tuple[int, ...] = (1_000, 10_000, 100_000, 1_000_000)
    payload_requests: int = 200
    #: Server levers (threads × workers, logging, batch delay, client channel reuse).
    server_levers: bool = True
    lever_requests: int = 300
    #: In-process levers (inference_mode, channels_last, TorchScript, torch.compile).
    model_levers: bool = True
    lever_iterations: int = 200
    #: torch.compile takes a minute or more to compile on a small CPU.
    compile_lever: bool = True
    quick: bool = False

    def servers(self) -> tuple[ServerConfig, ...]:
        """The main configurations: batching off and on, for each worker count."""
        configs = []
        for workers in self.workers:
            for batching in self.batching:
                plural = "s" if workers > 1 else ""
                configs.append(ServerConfig(
                    label=f"batching {'on' if batching else 'off'}, {workers} worker{plural}",
                    workers=workers,
                    batch_size=self.batch_size if batching else 1,
                    max_batch_delay_ms=self.max_batch_delay_ms,
                ))
        return tuple(configs)


FULL = BenchSettings()
QUICK = BenchSettings(
    requests=32, warmup=4, server_warmup=16, workers=(1,), images=32, floor_requests=32,
    payload_sizes=(1_000, 100_000), payload_requests=8, server_levers=False,
    lever_iterations=10, compile_lever=False, quick=True,
)


# -- images ------------------------------------------------------------------------------------
def bench_images(n: int) -> tuple[list[bytes], list[int]]:
    """The first ``n`` MNIST test digits as PNG bytes (a few hundred bytes each), and labels."""
    data.ensure_mnist()
    images, labels = data.load_split(train=False)
    return [synthetic.png(image.numpy()) for image in images[:n]], labels[:n].tolist()


def padded_png(png: bytes, size: int) -> bytes:
    """The same PNG grown to ``size`` bytes by a private ancillary chunk that decoders skip.

    The image, and so the work of decoding and classifying it, stays the same: only the bytes
    on the wire grow. A ``size`` smaller than the PNG returns it unchanged.
    """
    extra = size - len(png) - 12  # a chunk is length (4) + type (4) + body + CRC (4)
    if extra < 0:
        return png
    import zlib

    body = bytes(extra)
    kind = b"dsPd"  # lowercase first letter: ancillary; lowercase second: private
    chunk = (len(body).to_bytes(4, "big") + kind + body
             + zlib.crc32(kind + body).to_bytes(4, "big"))
    header_end = 8 + 25  # signature, then the IHDR chunk (13-byte body)
    return png[:header_end] + chunk + png[header_end:]


# -- the in-process floor ----------------------------------------------------------------------
def load_served_model(mar: Path) -> DigitCNN:
    """DigitCNN (eager) with the very weights inside ``mar``; ``for_serving`` makes it the
    handler's model."""
    with zipfile.ZipFile(mar) as archive:
        manifest = json.loads(archive.read("MAR-INF/MANIFEST.json"))
        weights = archive.read(manifest["model"]["serializedFile"])
    model = DigitCNN()
    model.load_state_dict(torch.load(io.BytesIO(weights), map_location="cpu", weights_only=True))
    return model.eval()


@torch.inference_mode()
def predict_in_process(model: torch.nn.Module, payloads: Sequence[bytes]) -> list[int]:
    """What the handler does for a batch, minus TorchServe: digits for PNG payloads."""
    digits = np.stack([preprocessing.digit_from_payload(payload) for payload in payloads])
    inputs = preprocessing.to_model_input(torch.from_numpy(digits)).contiguous(
        memory_format=torch.channels_last
    )
    return F.softmax(model(inputs).float(), dim=1).argmax(dim=1).tolist()


@dataclass
class Measurement:
    """The timed part of one measurement: per-call latencies and the wall time of them all."""

    latencies_s: list[float]
    wall_s: float
    images_per_call: int = 1
    firsts_s: list[float] = field(default_factory=list)
    errors: int = 0
    mismatches: int = 0
    first_error: str = ""
    #: CPU seconds the timed part took in this process (the client, or the floor) and in the
    #: server's processes (Java frontend and Python workers): far steadier than wall time on a
    #: busy machine, and what a server's cost really is.
    client_cpu_s: float | None = None
    server_cpu_s: float | None = None

    def summary(self) -> dict:
        ms = np.asarray(self.latencies_s) * 1000
        p50, p90, p99 = (np.percentile(ms, q) if len(ms) else math.nan for q in (50, 90, 99))
        calls = len(self.latencies_s) + self.errors
        images = max(calls * self.images_per_call, 1)
        return {
            "requests": calls * self.images_per_call,
            "errors": self.errors,
            "mismatches": self.mismatches,
            "p50_ms": _round(p50),
            "p90_ms": _round(p90),
            "p99_ms": _round(p99),
            "mean_ms": _round(float(ms.mean()) if len(ms) else math.nan),
            "throughput_rps": _round(len(ms) * self.images_per_call / self.wall_s
                                     if self.wall_s else math.nan, 1),
            "first_p50_ms": (_round(float(np.percentile(np.asarray(self.firsts_s) * 1000, 50)))
                             if self.firsts_s else None),
            "client_cpu_ms": (None if self.client_cpu_s is None
                              else _round(self.client_cpu_s * 1000 / images)),
            "server_cpu_ms": (None if self.server_cpu_s is None
                              else _round(self.server_cpu_s * 1000 / images)),
            "first_error": self.first_error,
        }


def measure_floor(model: torch.nn.Module, payloads: Sequence[bytes], expected: Sequence[int],
                  settings: BenchSettings, progress: bool = True, threads: int | None = None
                  ) -> dict[str, Measurement]:
    """The in-process floor at batch 1 and batch 8, plus preprocessing and forward alone.

    ``threads``: torch threads to measure with (this process's setting is restored after).
    """
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _measure_floor(model, payloads, expected, settings, progress)
    finally:
        torch.set_num_threads(before)


def _measure_floor(model: torch.nn.Module, payloads: Sequence[bytes], expected: Sequence[int],
                   settings: BenchSettings, progress: bool) -> dict[str, Measurement]:
    n, warmup = settings.floor_requests, min(settings.warmup, settings.floor_requests)
    out = {}
    for batch in (1, settings.batch_size):
        calls = max(1, n // batch)
        groups = [[(start + i) % len(payloads) for i in range(batch)]
                  for start in range(0, (calls + warmup) * batch, batch)]
        latencies, mismatches, cpu = [], 0, 0.0
        for index, group in enumerate(progress_bar(groups, desc=f"in-process, batch {batch}",
                                                   leave=False, disable=_quiet(progress))):
            cpu_started, started = time.process_time(), time.perf_counter()
            digits = predict_in_process(model, [payloads[i] for i in group])
            elapsed = time.perf_counter() - started
            if index >= warmup:
                latencies.append(elapsed)
                cpu += time.process_time() - cpu_started
                mismatches += sum(d != expected[i] for d, i in zip(digits, group, strict=True))
        out[f"batch{batch}"] = Measurement(latencies, sum(latencies), images_per_call=batch,
                                           mismatches=mismatches, client_cpu_s=cpu)
    # The two halves of batch 1, to see where the floor's time goes.
    prepare, forward = [], []
    for index in range(min(n, 200) + warmup):
        payload = payloads[index % len(payloads)]
        started = time.perf_counter()
        digit = torch.from_numpy(preprocessing.digit_from_payload(payload))[None]
        inputs = preprocessing.to_model_input(digit).contiguous(memory_format=torch.channels_last)
        middle = time.perf_counter()
        with torch.inference_mode():
            F.softmax(model(inputs), dim=1)
        if index >= warmup:
            prepare.append(middle - started)
            forward.append(time.perf_counter() - middle)
    out["preprocess"] = Measurement(prepare, sum(prepare))
    out["forward"] = Measurement(forward, sum(forward))
    return out


# -- callers -----------------------------------------------------------------------------------
class GrpcCaller:
    """gRPC Predictions through a ``DigitClient`` that every caller thread shares."""

    def __init__(self, client: DigitClient) -> None:
        self.client = client

    def __call__(self, payload: bytes) -> tuple[int, float | None]:
        return self.client.predict(payload).digit, None

    def close(self) -> None:
        """The shared client is closed by whoever opened it."""


class StreamCaller(GrpcCaller):
    """gRPC StreamPredictions: the top-3 message first, then the full answer."""

    def __call__(self, payload: bytes) -> tuple[int, float | None]:
        started, first, digit = time.perf_counter(), None, -1
        for answer in self.client.stream(payload):
            if first is None:
                first = time.perf_counter() - started
            digit = answer.get("digit", digit)
        return digit, first


class RestCaller:
    """REST ``POST /predictions/<model>`` over one kept-alive HTTP/1.1 connection."""

    def __init__(self, host: str, port: int, key: str, timeout_s: float = CALL_DEADLINE_S
                 ) -> None:
        self.host, self.port, self.timeout_s = host, port, timeout_s
        self.path = f"/predictions/{config.MODEL_NAME}"
        self.headers = {"Content-Type": "application/octet-stream",
                        "Authorization": f"Bearer {key}"}
        self.connection = http.client.HTTPConnection(host, port, timeout=timeout_s)
        self.reconnects = 0

    def __call__(self, payload: bytes) -> tuple[int, float | None]:
        for attempt in (1, 2):
            try:
                self.connection.request("POST", self.path, body=payload, headers=self.headers)
                response = self.connection.getresponse()
                body = response.read()
                break
            except (OSError, http.client.HTTPException) as err:
                # A connection the server closed, or one left mid-answer by a timeout, cannot
                # carry the next request: open a new one (and retry once when it was closed).
                self._reconnect()
                closed = isinstance(err, (http.client.RemoteDisconnected, ConnectionResetError,
                                          BrokenPipeError))
                if attempt == 2 or not closed:
                    raise
        if response.status != 200:
            raise ServingError(f"REST {response.status}: {body[:200].decode(errors='replace')}")
        return json.loads(body)["digit"], None

    def _reconnect(self) -> None:
        self.connection.close()
        self.connection = http.client.HTTPConnection(self.host, self.port,
                                                     timeout=self.timeout_s)
        self.reconnects += 1

    def close(self) -> None:
        self.connection.close()


Caller = Callable[[bytes], tuple[int, "float | None"]]


def drive(make_caller: Callable[[], Caller], payloads: Sequence[bytes],
          expected: Sequence[int], requests: int, concurrency: int, warmup: int,
          desc: str = "", progress: bool = True,
          server_cpu: Callable[[], float] | None = None) -> Measurement:
    """``requests`` timed calls from ``concurrency`` threads, after untimed warm-up calls.

    Each thread makes its own caller (a REST connection, or the shared gRPC client), makes its
    share of the warm-up calls (at least one, so every connection is open), then all threads
    start the timed calls together and take the next image until ``requests`` are done.
    Throughput is timed calls over the wall time from that start to the last answer.
    ``server_cpu`` returns the server's CPU seconds so far, read at that start and at the end.
    """
    warm_each = max(1, math.ceil(warmup / concurrency))
    counter = itertools.count()
    start = threading.Barrier(concurrency + 1, timeout=START_TIMEOUT_S)
    lock = threading.Lock()
    latencies: list[float] = []
    firsts: list[float] = []
    failures: list[str] = []
    mismatches = [0]
    bar = progress_bar(total=requests, desc=desc, leave=False, disable=_quiet(progress))

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
            mine, my_firsts = [], []
            while (index := next(counter)) < requests:
                payload_index = index % len(payloads)
                began = time.perf_counter()
                try:
                    digit, first = caller(payloads[payload_index])
                except Exception as err:  # noqa: BLE001 - a failed call is a figure too
                    with lock:
                        failures.append(f"{type(err).__name__}: {err}")
                    continue
                finally:
                    bar.update()
                mine.append(time.perf_counter() - began)
                if first is not None:
                    my_firsts.append(first)
                if digit != expected[payload_index]:
                    with lock:
                        mismatches[0] += 1
            with lock:
                latencies.extend(mine)
                firsts.extend(my_firsts)
        finally:
            caller.close()

    threads = [threading.Thread(target=worker, args=(slot,), daemon=True)
               for slot in range(concurrency)]
    for thread in threads:
        thread.start()
    try:
        start.wait()
    except threading.BrokenBarrierError:
        bar.close()
        raise RuntimeError(f"{desc}: the caller threads did not get ready: {failures[:1]}"
                           ) from None
    began, cpu_began = time.perf_counter(), time.process_time()
    server_began = server_cpu() if server_cpu else None
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - began
    client_cpu = time.process_time() - cpu_began
    server_used = server_cpu() - server_began if server_cpu else None
    bar.close()
    timed_failures = [f for f in failures if not f.startswith("warm-up")]
    return Measurement(latencies, wall, firsts_s=firsts, errors=len(timed_failures),
                       mismatches=mismatches[0], first_error=(failures or [""])[0],
                       client_cpu_s=client_cpu, server_cpu_s=server_used)


# -- servers -----------------------------------------------------------------------------------
def server_settings(server: ServerConfig, run_dir: Path, model_store: Path) -> ServerSettings:
    """TorchServe settings for one configuration, on free ports, in its own run directory."""
    run_dir = Path(run_dir)
    properties = {}
    if server.logging in ("quiet", "lean"):
        run_dir.mkdir(parents=True, exist_ok=True)
        log_config = run_dir / f"log4j2-{server.logging}.xml"
        log_config.write_text(QUIET_LOG4J2 if server.logging == "quiet" else LEAN_LOG4J2)
        if server.logging == "lean":
            properties["metrics_mode"] = "prometheus"
        # The JVM options the kit sets, plus log4j's configuration file.
        base = ServerSettings(run_dir=run_dir, model_store=model_store)
        defaults = dict(line.split("=", 1) for line in config_properties(base).splitlines())
        properties["vmargs"] = f"{defaults['vmargs']} -Dlog4j.configurationFile=file://{log_config}"
    elif server.logging == "async":
        properties["async_logging"] = "true"
    elif server.logging == "prometheus":
        properties["metrics_mode"] = "prometheus"
    elif server.logging != "default":
        raise ValueError("logging is 'default', 'quiet', 'lean', 'async' or 'prometheus', "
                         f"not {server.logging!r}")
    spec = ModelSpec(workers=server.workers, batch_size=server.batch_size,
                     max_batch_delay_ms=server.max_batch_delay_ms)
    return ServerSettings(ports=free_ports(), run_dir=run_dir, model_store=model_store,
                          models=(spec,), torch_threads=server.torch_threads,
                          extra_properties=properties)


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


def log_bytes(run_dir: Path) -> int:
    """Bytes TorchServe has written to its logs in ``run_dir`` so far."""
    files = [*Path(run_dir).glob("logs/*.log"), Path(run_dir) / "torchserve.out"]
    return sum(path.stat().st_size for path in files if path.is_file())


@dataclass
class ServerPlan:
    """What to measure on one server: (mode, concurrency) pairs, each ``requests`` long."""

    runs: tuple[tuple[str, int], ...]
    requests: int
    payload_sweep: bool = False
    client_levers: bool = False


def measure_server(server: ServerConfig, plan: ServerPlan, settings: BenchSettings,
                   model_store: Path, run_dir: Path, payloads: Sequence[bytes],
                   expected: Sequence[int], progress: bool = True,
                   on_start: Callable[[TorchServe], None] | None = None) -> dict:
    """Start a fresh TorchServe, time its cold start, run ``plan`` against it, stop it."""
    ts = TorchServe(server_settings(server, run_dir, model_store))
    saved = os.environ.get("OMP_WAIT_POLICY")
    if server.omp_wait_policy:  # TorchServe's processes inherit this process's environment
        os.environ["OMP_WAIT_POLICY"] = server.omp_wait_policy
    try:
        began = time.perf_counter()
        ts.start(timeout_s=START_TIMEOUT_S)
    finally:
        if saved is None:
            os.environ.pop("OMP_WAIT_POLICY", None)
        else:
            os.environ["OMP_WAIT_POLICY"] = saved
    out: dict = {"config": server, "runs": {}, "payload": [], "client": []}
    try:
        if on_start:
            on_start(ts)
        ready = time.perf_counter() - began
        client = DigitClient.for_run_dir(ts.run_dir, deadline_s=CALL_DEADLINE_S)
        try:
            client.predict(payloads[0])
            first = time.perf_counter() - began
            out["cold_start"] = {"ready_s": round(ready, 3), "first_prediction_s": round(first, 3),
                                 "first_request_ms": round((first - ready) * 1000, 1)}
            key = read_key(ts.key_file, "inference")
            http_port = ts.settings.ports.http_inference
            pid = ts.process.pid
            meter = lambda: server_cpu_seconds(pid)  # noqa: E731
            callers = {
                GRPC: lambda: GrpcCaller(client),
                STREAM: lambda: StreamCaller(client),
                REST: lambda: RestCaller(config.HOST, http_port, key),
            }
            busiest = max(c for _, c in plan.runs)
            for mode in dict.fromkeys(mode for mode, _ in plan.runs):
                drive(callers[mode], payloads, expected, settings.server_warmup, busiest, 0,
                      desc=f"{server.label}: warming up {mode}", progress=progress)
            logged_before = log_bytes(ts.run_dir)
            timed = 0
            for mode, concurrency in plan.runs:
                make = callers[mode]
                out["runs"][(mode, concurrency)] = drive(
                    make, payloads, expected, plan.requests, concurrency, settings.warmup,
                    desc=f"{server.label}: {mode} × {concurrency}", progress=progress,
                    server_cpu=meter,
                )
                timed += plan.requests + concurrency * max(1, math.ceil(settings.warmup
                                                                        / concurrency))
            out["log_bytes_per_request"] = round((log_bytes(ts.run_dir) - logged_before)
                                                 / max(timed, 1), 1)
            if plan.payload_sweep:
                out["payload"] = measure_payloads(client, config.HOST, http_port, key, payloads,
                                                  expected, settings, progress, meter)
            if plan.client_levers:
                out["client"] = measure_client_levers(ts, client, payloads, expected, settings,
                                                      progress, meter)
        finally:
            client.close()
    finally:
        ts.stop()
    return out


def measure_payloads(client: DigitClient, host: str, http_port: int, key: str,
                     payloads: Sequence[bytes], expected: Sequence[int], settings: BenchSettings,
                     progress: bool = True, server_cpu: Callable[[], float] | None = None
                     ) -> list[dict]:
    """gRPC and REST, one caller, the same digits padded to each of ``payload_sizes``."""
    rows = []
    sizes = (0, *settings.payload_sizes)  # 0: the PNGs as they are
    for size in sizes:
        padded = [padded_png(payload, size) for payload in payloads]
        for mode, make in ((GRPC, lambda: GrpcCaller(client)),
                           (REST, lambda: RestCaller(host, http_port, key))):
            measured = drive(make, padded, expected, settings.payload_requests, 1,
                             min(settings.warmup, 10), desc=f"payload {size:,} B: {mode}",
                             progress=progress, server_cpu=server_cpu)
            rows.append({"mode": mode, "payload_bytes": int(np.mean([len(p) for p in padded])),
                         **measured.summary()})
    return rows


def measure_client_levers(ts: TorchServe, client: DigitClient, payloads: Sequence[bytes],
                          expected: Sequence[int], settings: BenchSettings,
                          progress: bool = True, server_cpu: Callable[[], float] | None = None
                          ) -> list[dict]:
    """One caller, gRPC: the kit's shared client against other ways of calling.

    A new ``DigitClient`` (two channels) per call; a raw stub on the kit's channel with the
    token read once (``DigitClient`` reads the key file on every call, so a renewed key is
    picked up); a raw stub on a plain channel (no retry policy, no keepalive options).
    """
    import grpc

    from digitserve.grpc_stubs import inference_pb2, inference_pb2_grpc

    n = min(settings.lever_requests, settings.requests)
    metadata = client.metadata("inference")
    target = f"{config.HOST}:{ts.settings.ports.grpc_inference}"
    plain_channel = grpc.insecure_channel(target)

    def raw(stub):
        def call(payload: bytes) -> tuple[int, None]:
            request = inference_pb2.PredictionsRequest(model_name=config.MODEL_NAME,
                                                       input={"data": payload})
            reply = stub.Predictions(request, timeout=client.deadline_s, metadata=metadata)
            return json.loads(reply.prediction)["digit"], None
        return call

    def fresh(payload: bytes) -> tuple[int, None]:
        with DigitClient.for_run_dir(ts.run_dir, deadline_s=CALL_DEADLINE_S) as one_off:
            return one_off.predict(payload).digit, None

    variants = (
        ("one DigitClient for every call (the kit's way)", GrpcCaller(client)),
        ("a new DigitClient (channel) per call", fresh),
        ("raw stub on the kit's channel, token read once",
         raw(inference_pb2_grpc.InferenceAPIsServiceStub(client.inference_channel))),
        ("raw stub on a plain channel (no retry policy), token read once",
         raw(inference_pb2_grpc.InferenceAPIsServiceStub(plain_channel))),
    )
    rows = []
    try:
        for variant, call in variants:
            caller = call if hasattr(call, "close") else _Closing(call)
            measured = drive(lambda c=caller: c, payloads, expected, n, 1, settings.warmup,
                             desc=f"client: {variant}", progress=progress,
                             server_cpu=server_cpu)
            rows.append({"lever": "client channel reuse", "variant": variant,
                         **measured.summary()})
    finally:
        plain_channel.close()
    return rows


class _Closing:
    """A plain function as a caller with a ``close`` that does nothing."""

    def __init__(self, function: Caller) -> None:
        self.function = function

    def __call__(self, payload: bytes) -> tuple[int, float | None]:
        return self.function(payload)

    def close(self) -> None:
        pass


# -- in-process levers -------------------------------------------------------------------------
def measure_model_levers(weights: DigitCNN, served: torch.nn.Module,
                         payloads: Sequence[bytes], settings: BenchSettings,
                         progress: bool = True) -> list[dict]:
    """Forward pass only, batch 1 (p50) and batch ``batch_size`` (images/s), per variant.

    ``weights`` is the eager model, of which each variant prepares its own copy (its setup is
    measured); ``served`` is the floor's model (``for_serving``), timed per thread count.
    """
    digits = torch.from_numpy(np.stack([preprocessing.digit_from_payload(p)
                                        for p in payloads[: settings.batch_size]]))
    contiguous = {1: preprocessing.to_model_input(digits[:1]),
                  settings.batch_size: preprocessing.to_model_input(digits)}
    last = {b: x.contiguous(memory_format=torch.channels_last) for b, x in contiguous.items()}
    plain = copy.deepcopy(weights)
    eager_last = copy.deepcopy(weights).to(memory_format=torch.channels_last)
    cpus = os.cpu_count() or 1
    threads_before = torch.get_num_threads()

    def grad_on(m: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        return m(x)

    def no_grad(m: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return m(x)

    def inference(m: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return m(x)

    variants: list[tuple[str, str, Callable[[], tuple]]] = [
        ("autograd", "grad enabled (plain forward)", lambda: (plain, contiguous, grad_on)),
        ("autograd", "torch.no_grad", lambda: (plain, contiguous, no_grad)),
        ("autograd", "torch.inference_mode", lambda: (plain, contiguous, inference)),
        ("memory format", "inference_mode + channels_last", lambda: (eager_last, last, inference)),
        ("graph", "TorchScript (trace + freeze) + channels_last (the handler)",
         lambda: (for_serving(copy.deepcopy(weights), preprocessing.IMAGE_SIZE), last, inference)),
    ]
    if settings.compile_lever:
        variants.append(("graph", "torch.compile (inductor) + channels_last",
                         lambda: (torch.compile(eager_last), last, inference)))
    rows = []
    for lever, variant, prepare in progress_bar(variants, desc="model levers", leave=False,
                                                disable=_quiet(progress)):
        try:
            started = time.perf_counter()
            m, inputs, run = prepare()
            for x in inputs.values():  # warm-up; compiles where there is compiling to do
                for _ in range(3):
                    run(m, x)
            setup_s = time.perf_counter() - started
            rows.append({"lever": lever, "variant": variant, "setup_s": round(setup_s, 2),
                         **_forward_figures(m, inputs, run, settings)})
        except Exception as err:  # noqa: BLE001 - a lever that cannot run here is a finding
            rows.append({"lever": lever, "variant": variant,
                         "note": f"unavailable here: {type(err).__name__}: {str(err)[:160]}"})
    for threads in sorted({1, cpus}):
        torch.set_num_threads(threads)
        try:
            rows.append({"lever": "torch threads", "variant": f"{threads} thread"
                         + ("s" if threads > 1 else "") + " (the handler's TorchScript)",
                         **_forward_figures(served, last, inference, settings)})
        finally:
            torch.set_num_threads(threads_before)
    return rows


def _forward_figures(model: torch.nn.Module, inputs: dict[int, torch.Tensor],
                     run: Callable, settings: BenchSettings) -> dict:
    single, batch = min(inputs), max(inputs)
    n = settings.lever_iterations
    times = []
    cpu_started = time.process_time()
    for _ in range(n):
        started = time.perf_counter()
        run(model, inputs[single])
        times.append(time.perf_counter() - started)
    cpu = time.process_time() - cpu_started
    started = time.perf_counter()
    for _ in range(max(1, n // batch)):
        run(model, inputs[batch])
    batched = max(1, n // batch) * batch / (time.perf_counter() - started)
    return {"p50_ms": _round(float(np.percentile(times, 50)) * 1000),
            "throughput_rps": _round(batched, 1), "cpu_ms": _round(cpu * 1000 / n)}


# -- the whole run -----------------------------------------------------------------------------
def run_benchmark(settings: BenchSettings = FULL, model_store: Path = config.MODEL_STORE,
                  out_dir: Path = BENCH_DIR, run_root: Path | None = None,
                  progress: bool = True,
                  on_start: Callable[[TorchServe], None] | None = None) -> dict:
    """Measure everything ``settings`` asks for; write JSON, CSV, markdown and PNGs.

    Args:
        settings: ``FULL`` or ``QUICK`` (or your own ``BenchSettings``).
        model_store: where ``digit-model.mar`` is (notebook 02 makes it).
        out_dir: where the results go (``build/bench`` by default).
        run_root: where the servers' run directories go (one per configuration, emptied
            before it starts; its logs stay there): by default ``config.RUN_DIR / "bench"``.
            Keep the path short: TorchServe's worker sockets live in it.
        on_start: called with each TorchServe right after it started (tests record it).

    Returns:
        The results, as written to ``results.json``, with ``files`` naming what was written.
    """
    mar = Path(model_store) / f"{config.ARCHIVE_NAME}.mar"
    if not mar.is_file():
        raise FileNotFoundError(
            f"no {mar}: run notebooks/02_archive.ipynb (or `digitserve archive`) first."
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    run_root = Path(run_root) if run_root else config.RUN_DIR / "bench"
    payloads, _ = bench_images(settings.images)
    weights = load_served_model(mar)
    model = for_serving(copy.deepcopy(weights), preprocessing.IMAGE_SIZE,
                         batch_sizes=(1, settings.batch_size))
    expected = [predict_in_process(model, [p])[0] for p in payloads]
    results: dict = {"settings": asdict(settings), "environment": environment(),
                     "mar": str(mar), "servers": [], "rows": [], "payload": [], "levers": [],
                     "samples": {}}
    # The floor with one torch thread and with one per CPU: the faster is the floor. (Threads
    # that wait for each other on a busy machine can make "all CPUs" the slower one, by far.)
    floors = {threads: measure_floor(model, payloads, expected, settings, progress, threads)
              for threads in sorted({1, os.cpu_count() or 1})}
    _add_floor(results, floors, settings)
    if settings.model_levers:
        results["levers"] += measure_model_levers(weights, model, payloads, settings, progress)
    del model

    max_c = max(settings.concurrencies)
    # Modes interleaved, concurrency by concurrency: a drift (the JIT, another program) then
    # touches every mode alike.
    main_runs = tuple((mode, c) for c in settings.concurrencies for mode in MODES)
    lever_runs = ((GRPC, 1), (GRPC, max_c))
    plans: list[tuple[str, ServerConfig, ServerPlan]] = []
    for index, server in enumerate(settings.servers()):
        plans.append(("main", server, ServerPlan(
            main_runs, settings.requests, payload_sweep=index == 0,
            client_levers=index == 0 and settings.server_levers)))
    if settings.server_levers:
        for server in lever_servers(settings):
            plans.append(("lever", server, ServerPlan(lever_runs, settings.lever_requests)))
    for kind, server, plan in progress_bar(plans, desc="servers", disable=not progress):
        run_dir = run_root / server.slug
        shutil.rmtree(run_dir, ignore_errors=True)  # the logs of a previous run
        measured = measure_server(server, plan, settings, model_store, run_dir, payloads,
                                  expected, progress, on_start)
        _add_server(results, kind, measured)
    results["environment"]["load_average_end"] = _load_average()
    results["targets"] = targets(results)
    results["findings"] = findings(results)
    results["files"] = write_results(results, out_dir)
    return results


def lever_servers(settings: BenchSettings) -> list[ServerConfig]:
    """Batching off: torch threads × workers, the logging set-ups, and other batch delays."""
    cpus = os.cpu_count() or 1
    servers = []
    for workers in sorted({1, cpus}):
        for threads in sorted({1, cpus}):
            oversubscribed = " (TorchServe's own default)" if workers == threads == cpus > 1 else ""
            servers.append(ServerConfig(
                f"{workers} worker{'s' if workers > 1 else ''} × {threads} torch "
                f"thread{'s' if threads > 1 else ''}{oversubscribed}",
                workers=workers, torch_threads=threads))
    if cpus > 1:
        servers.append(ServerConfig(f"1 worker × {cpus} torch threads, OMP_WAIT_POLICY=PASSIVE",
                                    torch_threads=cpus, omp_wait_policy="PASSIVE"))
    # Logging is compared with "1 worker × 1 torch thread": no OpenMP waiting to blur it.
    for logging, what in (("prometheus", "metrics_mode=prometheus"),
                          ("lean", "bench.LEAN_LOG4J2 + metrics_mode=prometheus"),
                          ("quiet", "bench.QUIET_LOG4J2"), ("async", "async_logging=true")):
        servers.append(ServerConfig(f"1 worker × 1 torch thread, logging: {what}",
                                    torch_threads=1, logging=logging))
    for delay in (1, 20):
        if delay != settings.max_batch_delay_ms:
            servers.append(ServerConfig(
                f"batch {settings.batch_size}, delay {delay} ms, 1 worker",
                batch_size=settings.batch_size, max_batch_delay_ms=delay))
    return servers


def environment() -> dict:
    """The machine and software the figures were measured on."""
    import grpc
    import torchvision

    try:
        from ts.version import __version__ as torchserve_version
    except ImportError:
        torchserve_version = "?"
    return {
        "cpus": os.cpu_count(),
        "torch_threads_in_process": torch.get_num_threads(),
        "load_average_start": _load_average(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "torchserve": torchserve_version,
        "grpcio": grpc.__version__,
        "started_at": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def _quiet(progress: bool) -> bool:
    """Hide the short-lived inner bars in head-less runs (an executed notebook keeps every
    redraw of a text bar); the bar over the servers still shows."""
    return not progress or HEADLESS


def _load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _add_floor(results: dict, floors: dict[int, dict[str, Measurement]],
               settings: BenchSettings) -> None:
    """The floor: the lowest batch-1 p50 and the highest batch throughput over thread counts."""
    batch = settings.batch_size
    summaries = {t: {name: m.summary() for name, m in floor.items()}
                 for t, floor in floors.items()}
    single = min(summaries, key=lambda t: summaries[t]["batch1"]["p50_ms"])
    batched = max(summaries, key=lambda t: summaries[t][f"batch{batch}"]["throughput_rps"])
    results["floor"] = {
        "batch1_p50_ms": summaries[single]["batch1"]["p50_ms"],
        "batch1_throughput_rps": summaries[single]["batch1"]["throughput_rps"],
        f"batch{batch}_p50_ms": summaries[batched][f"batch{batch}"]["p50_ms"],
        "batch_throughput_rps": summaries[batched][f"batch{batch}"]["throughput_rps"],
        "batch_size": batch,
        "preprocess_p50_ms": summaries[single]["preprocess"]["p50_ms"],
        "forward_p50_ms": summaries[single]["forward"]["p50_ms"],
        "torch_threads": single,
        "batch_torch_threads": batched,
        "by_threads": {t: {"batch1_p50_ms": s["batch1"]["p50_ms"],
                           "batch_throughput_rps": s[f"batch{batch}"]["throughput_rps"]}
                       for t, s in summaries.items()},
    }
    for threads, floor in floors.items():
        for name in ("batch1", f"batch{batch}"):
            images = 1 if name == "batch1" else batch
            label = f"in-process, {threads} torch thread{'s' if threads > 1 else ''}"
            row = _row(IN_PROCESS, label, None, images, floor[name], results, threads)
            row["concurrency"] = 1
            results["rows"].append(row)


def _add_server(results: dict, kind: str, measured: dict) -> None:
    server: ServerConfig = measured["config"]
    entry = {"kind": kind, **asdict(server), **measured.get("cold_start", {}),
             "log_bytes_per_request": measured.get("log_bytes_per_request")}
    results["servers"].append(entry)
    for (mode, concurrency), measurement in measured["runs"].items():
        row = _row(mode, server.label, server, 1, measurement, results)
        row.update(concurrency=concurrency, kind=kind)
        results["rows"].append(row)
    for row in measured["payload"]:
        results["payload"].append({"config": server.label, **row})
    results["levers"] += measured["client"]


ROW_FIELDS = ("id", "kind", "config", "mode", "concurrency", "images_per_call", "workers",
              "torch_threads", "batch_size", "max_batch_delay_ms", "logging", "requests",
              "errors", "mismatches", "p50_ms", "p90_ms", "p99_ms", "mean_ms", "throughput_rps",
              "first_p50_ms", "client_cpu_ms", "server_cpu_ms", "p50_vs_floor",
              "throughput_vs_floor", "first_error")


def _row(mode: str, label: str, server: ServerConfig | None, images: int,
         measurement: Measurement, results: dict, threads: int | None = None) -> dict:
    summary = measurement.summary()
    floor = results["floor"]
    row_id = f"{server.slug if server else 'in-process'}/{mode}/{images}/" \
             f"{len(results['rows'])}"
    results["samples"][row_id] = [round(s * 1000, 3) for s in measurement.latencies_s]
    row = {
        "id": row_id, "kind": "floor" if server is None else "main", "config": label,
        "mode": mode, "images_per_call": images,
        "workers": server.workers if server else None,
        "torch_threads": server.torch_threads if server else threads,
        "batch_size": server.batch_size if server else images,
        "max_batch_delay_ms": server.max_batch_delay_ms if server else None,
        "logging": server.logging if server else None,
        **summary,
    }
    # Latency against one image in-process; throughput against the batched floor.
    row["p50_vs_floor"] = _ratio(summary["p50_ms"], floor["batch1_p50_ms"])
    row["throughput_vs_floor"] = _ratio(summary["throughput_rps"], floor["batch_throughput_rps"])
    return row


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not b or math.isnan(a) or math.isnan(b):
        return None
    return round(a / b, 3)


def _round(value: float, digits: int = 3) -> float:
    return round(float(value), digits)


# -- targets and findings ----------------------------------------------------------------------
def _rows(results: dict, kind: str = "main", **match: object) -> list[dict]:
    return [row for row in results["rows"] if row.get("kind") == kind
            and all(row.get(key) == value for key, value in match.items())]


def targets(results: dict) -> list[dict]:
    """The issue's targets, reported (never asserted): value, goal, met, where measured."""
    floor = results["floor"]
    out = []
    single = _rows(results, mode=GRPC, concurrency=1)
    if single:
        best = min(single, key=lambda row: row["p50_ms"])
        out.append(_target("gRPC single-caller p50 ÷ in-process p50 (preprocess + forward, "
                           "batch 1)", best["p50_vs_floor"], "≤ 1.25", best["p50_vs_floor"]
                           is not None and best["p50_vs_floor"] <= 1.25,
                           f"{best['config']}: {best['p50_ms']} ms vs "
                           f"{floor['batch1_p50_ms']} ms"))
    max_c = max((row["concurrency"] for row in _rows(results, mode=GRPC)), default=1)
    batched = [row for row in _rows(results, mode=GRPC, concurrency=max_c)
               if row["batch_size"] > 1]
    if batched:
        best = max(batched, key=lambda row: row["throughput_rps"])
        out.append(_target(f"gRPC throughput at {max_c} callers with batching ÷ in-process "
                           f"batch-{floor['batch_size']} throughput",
                           best["throughput_vs_floor"], "≥ 0.7",
                           (best["throughput_vs_floor"] or 0) >= 0.7,
                           f"{best['config']}: {best['throughput_rps']} vs "
                           f"{floor['batch_throughput_rps']} images/s"))
    pairs = grpc_vs_rest(results)
    if pairs:
        wins = [p for p in pairs if p["grpc_rps"] >= p["rest_rps"]]
        worst = min(pairs, key=lambda p: p["ratio"])
        out.append(_target("gRPC throughput ≥ REST at every concurrency",
                           f"{len(wins)} of {len(pairs)}", "all", len(wins) == len(pairs),
                           f"lowest gRPC ÷ REST {worst['ratio']:.2f} ({worst['config']}, "
                           f"{worst['concurrency']} callers)"))
    starts = [s for s in results["servers"] if "first_prediction_s" in s]
    if starts:
        slowest = max(starts, key=lambda s: s["first_prediction_s"])
        out.append(_target("cold start: TorchServe.start() to the first gRPC prediction (s)",
                           slowest["first_prediction_s"], "≤ 8",
                           slowest["first_prediction_s"] <= 8,
                           f"slowest of {len(starts)} starts: {slowest['label']}"))
    return out


def _target(name: str, value: object, goal: str, met: bool, where: str) -> dict:
    return {"target": name, "value": value, "goal": goal, "met": bool(met), "measured": where}


def grpc_vs_rest(results: dict) -> list[dict]:
    """gRPC and REST throughput side by side for every main server and concurrency."""
    rest = {(r["config"], r["concurrency"]): r for r in _rows(results, mode=REST)}
    pairs = []
    for row in _rows(results, mode=GRPC):
        other = rest.get((row["config"], row["concurrency"]))
        if other and other["throughput_rps"]:
            pairs.append({"config": row["config"], "concurrency": row["concurrency"],
                          "grpc_rps": row["throughput_rps"], "rest_rps": other["throughput_rps"],
                          "ratio": row["throughput_rps"] / other["throughput_rps"],
                          "grpc_p50_ms": row["p50_ms"], "rest_p50_ms": other["p50_ms"],
                          "grpc_cpu_ms": _cpu(row), "rest_cpu_ms": _cpu(other)})
    return pairs


def _cpu(row: dict) -> float | None:
    """CPU milliseconds per request, client and server together (None when not measured)."""
    parts = (row.get("client_cpu_ms"), row.get("server_cpu_ms"))
    return None if None in parts else sum(parts)


def lever_servers_measured(results: dict) -> dict[str, dict]:
    """The lever servers of a run: label → {"server": its entry, "rows": {callers: row}}."""
    out = {}
    for server in results["servers"]:
        if server["kind"] == "lever":
            rows = {r["concurrency"]: r for r in results["rows"]
                    if r.get("kind") == "lever" and r["config"] == server["label"]}
            out[server["label"]] = {"server": server, "rows": rows}
    return out


def findings(results: dict) -> list[str]:
    """Plain sentences about what this run's numbers show (computed, not written in advance)."""
    floor, out = results["floor"], []
    by_threads = "; ".join(
        f"{t} thread{'s' if int(t) > 1 else ''}: {v['batch1_p50_ms']:.2f} ms, "
        f"{v['batch_throughput_rps']:.0f} images/s" for t, v in floor["by_threads"].items())
    out.append(
        f"In-process floor: preprocessing {floor['preprocess_p50_ms']:.2f} ms + forward "
        f"{floor['forward_p50_ms']:.2f} ms; one image end to end {floor['batch1_p50_ms']:.2f} ms "
        f"p50 (best with {floor['torch_threads']} torch thread"
        f"{'s' if floor['torch_threads'] > 1 else ''}), {floor['batch_throughput_rps']:.0f} "
        f"images/s in batches of {floor['batch_size']} (best with "
        f"{floor['batch_torch_threads']}). By torch threads: {by_threads}."
    )
    single = sorted(_rows(results, mode=GRPC, concurrency=1), key=lambda r: r["p50_ms"])
    if single:
        best = single[0]
        gap = best["p50_ms"] - floor["batch1_p50_ms"]
        meaning = (
            "that difference is everything TorchServe adds (HTTP/2 and protobuf, the Java "
            "frontend's queue, the socket to the Python worker, JSON of the answer)" if gap >= 0
            else "below the floor, which cannot really be: the floor was measured while the "
            "machine was busier, or its torch threads fought over the CPUs (compare its CPU "
            "per image with its latency); measure again on a quiet machine"
        )
        out.append(
            f"gRPC, one caller: {best['p50_ms']:.2f} ms p50 at best ({best['config']}), "
            f"{gap:+.2f} ms against the floor (×{best['p50_vs_floor']:.2f}): {meaning}."
        )
    pairs = grpc_vs_rest(results)
    if pairs:
        by_c: dict[int, list[dict]] = {}
        for pair in pairs:
            by_c.setdefault(pair["concurrency"], []).append(pair)
        parts = []
        for c, group in sorted(by_c.items()):
            ratios = [p["ratio"] for p in group]
            p50s = [p["grpc_p50_ms"] - p["rest_p50_ms"] for p in group]
            cpu = [p["grpc_cpu_ms"] - p["rest_cpu_ms"] for p in group
                   if p["grpc_cpu_ms"] is not None and p["rest_cpu_ms"] is not None]
            text = (f"{c} caller{'s' if c > 1 else ''}: gRPC ÷ REST throughput "
                    f"{min(ratios):.2f}–{max(ratios):.2f}, p50 difference "
                    f"{min(p50s):+.2f} to {max(p50s):+.2f} ms")
            if cpu:
                text += (f", CPU per request (client + server) {min(cpu):+.2f} to "
                         f"{max(cpu):+.2f} ms")
            parts.append(text)
        out.append("gRPC against REST, same server and image, gRPC minus REST where not a "
                   "ratio (" + "; ".join(parts) + ").")
    payload = results.get("payload") or []
    if payload:
        sizes = sorted({row["payload_bytes"] for row in payload})
        gaps = []
        for size in (sizes[0], sizes[-1]):
            by_mode = {row["mode"]: row for row in payload if row["payload_bytes"] == size}
            if GRPC in by_mode and REST in by_mode:
                gaps.append(f"{_bytes(size)}: gRPC {by_mode[GRPC]['p50_ms']:.2f} ms, "
                            f"REST {by_mode[REST]['p50_ms']:.2f} ms")
        out.append("Payload size, one caller, same digit (p50): " + "; ".join(gaps) + ".")
    streams = _rows(results, mode=STREAM, concurrency=1)
    unary = {r["config"]: r for r in _rows(results, mode=GRPC, concurrency=1)}
    if streams:
        s = streams[0]
        u = unary.get(s["config"])
        extra = f", unary {u['p50_ms']:.2f} ms" if u else ""
        out.append(
            f"Streaming ({s['config']}, one caller): first message (top-3) at "
            f"{s['first_p50_ms']:.2f} ms p50, full answer at {s['p50_ms']:.2f} ms{extra}. The "
            "handler computes both from one forward pass, so the top-3 arrives no earlier "
            "than a unary answer would."
        )
    max_c = max((r["concurrency"] for r in results["rows"]), default=1)
    for workers in sorted({r["workers"] for r in _rows(results) if r["workers"]}):
        rows = {r["batch_size"] > 1: r for r in _rows(results, mode=GRPC, workers=workers,
                                                      concurrency=max_c)}
        ones = {r["batch_size"] > 1: r for r in _rows(results, mode=GRPC, workers=workers,
                                                      concurrency=1)}
        if len(rows) == 2 and len(ones) == 2:
            out.append(
                f"Batching, {workers} worker{'s' if workers > 1 else ''}, gRPC: at {max_c} "
                f"callers {rows[False]['throughput_rps']:.0f} → {rows[True]['throughput_rps']:.0f}"
                f" images/s; a lone caller's p50 {ones[False]['p50_ms']:.2f} → "
                f"{ones[True]['p50_ms']:.2f} ms"
                + (" (it waits up to the batch delay for company)."
                   if ones[True]["p50_ms"] > ones[False]["p50_ms"] else
                   " (the batch delay cost it nothing visible in this run).")
            )
    model = [r for r in results["levers"] if r["lever"] not in ("client channel reuse",)
             and r.get("p50_ms") is not None]
    if model:
        out.append("In-process forward pass, batch 1 (p50 / CPU per image): " + "; ".join(
            f"{r['variant']} {r['p50_ms']:.2f} / {_fmt(r.get('cpu_ms'))} ms" for r in model)
            + ".")
    levers = lever_servers_measured(results)
    if levers:
        def describe(label: str, entry: dict) -> str:
            one, many = entry["rows"].get(1), entry["rows"].get(max_c)
            parts = [label + ":"]
            if one:
                parts.append(f"p50 {one['p50_ms']:.2f} ms alone")
            if many:
                parts.append(f"{many['throughput_rps']:.0f} images/s at {max_c} callers, "
                             f"server CPU {_fmt(many.get('server_cpu_ms'))} ms/request")
            parts.append(f"{_fmt(entry['server'].get('log_bytes_per_request'), 0)} log B/request")
            return " ".join(parts[:1]) + " " + ", ".join(parts[1:])

        threads = {label: e for label, e in levers.items()
                   if e["server"]["logging"] == "default" and e["server"]["batch_size"] == 1}
        others = {label: e for label, e in levers.items() if label not in threads}
        if threads:
            out.append("Workers × torch threads (batching off, gRPC): "
                       + "; ".join(describe(label, e) for label, e in threads.items()) + ".")
        if others:
            out.append("Logging and batch delay (gRPC): "
                       + "; ".join(describe(label, e) for label, e in others.items()) + ".")
    logs = [s["log_bytes_per_request"] for s in results["servers"]
            if s.get("log_bytes_per_request") is not None and s["logging"] == "default"]
    if logs:
        out.append(f"With its built-in log4j2.xml TorchServe wrote about {np.median(logs):.0f} "
                   "bytes of log per request (access log, metrics, DEBUG and duplicated lines, "
                   "and a copy of it all on the console).")
    starts = [s for s in results["servers"] if "first_prediction_s" in s]
    if starts:
        first = [s["first_prediction_s"] for s in starts]
        ready = [s["ready_s"] for s in starts]
        after = [s["first_request_ms"] for s in starts]
        steady = [r["p50_ms"] for r in results["rows"] if r["mode"] == GRPC
                  and r["concurrency"] == 1 and r.get("kind") in ("main", "lever")]
        out.append(
            f"Cold start to the first prediction: {min(first):.1f}–{max(first):.1f} s over "
            f"{len(starts)} starts. start() returned after {min(ready):.1f}–{max(ready):.1f} s "
            "(the JVM, the worker starting Python and torch, the model loading); the first "
            f"request then took {min(after):.0f}–{max(after):.0f} ms"
            + (f", against a p50 of {np.median(steady):.0f} ms once warm (one gRPC caller)"
               if steady else "")
            + ": the cost of first calls inside the worker and the frontend."
        )
    client = [r for r in results["levers"] if r["lever"] == "client channel reuse"]
    if len(client) >= 2:
        out.append(f"Client: a new channel per call costs {client[1]['p50_ms']:.2f} ms p50 "
                   f"against {client[0]['p50_ms']:.2f} ms on a reused one.")
    load = (results["environment"].get("load_average_start"),
            results["environment"].get("load_average_end"))
    out.append(f"Load average (1, 5, 15 min) at the start {load[0]} and end {load[1]} on "
               f"{results['environment']['cpus']} CPUs: figures from a busy machine are "
               "noise, not findings.")
    return out


def _bytes(size: float) -> str:
    for unit, scale in (("MB", 1e6), ("KB", 1e3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size:.0f} B"


# -- tables ------------------------------------------------------------------------------------
def markdown_table(results: dict, kind: str = "main") -> str:
    """The measurements as a markdown table: the floor first, then every server, mode, caller.

    CPU columns are milliseconds of CPU per image: the client's (for the floor, this process
    doing all the work) and the server's processes'.
    """
    header = ["server", "mode", "callers", "p50 ms", "p90 ms", "p99 ms", "images/s",
              "p50 ÷ floor", "images/s ÷ floor", "client CPU ms", "server CPU ms", "errors"]
    kinds = ("floor", kind) if kind == "main" else (kind,)
    lines = []
    for r in (r for r in results["rows"] if r["kind"] in kinds):
        mode = r["mode"] if r["mode"] != IN_PROCESS else f"in-process, batch {r['batch_size']}"
        if r["mode"] == STREAM and r["first_p50_ms"] is not None:
            mode += f" (first msg {r['first_p50_ms']:.2f} ms)"
        lines.append([r["config"], mode, r["concurrency"], _fmt(r["p50_ms"]),
                      _fmt(r["p90_ms"]), _fmt(r["p99_ms"]), _fmt(r["throughput_rps"], 0),
                      _fmt(r["p50_vs_floor"]), _fmt(r["throughput_vs_floor"]),
                      _fmt(r.get("client_cpu_ms")), _fmt(r.get("server_cpu_ms")),
                      r["errors"] + r["mismatches"]])
    return _markdown(header, lines)


def cold_start_table(results: dict) -> str:
    """Cold start of every server started, its first request, and its log bytes per request."""
    lines = [[s["label"], s["kind"], _fmt(s.get("ready_s"), 2), _fmt(s.get("first_request_ms"), 1),
              _fmt(s.get("first_prediction_s"), 2), _fmt(s.get("log_bytes_per_request"), 0)]
             for s in results["servers"]]
    return _markdown(["server", "kind", "start() returned (s)", "then the first request (ms)",
                      "cold start: first prediction (s)", "log bytes / request"], lines)


def targets_table(results: dict) -> str:
    lines = [[t["target"], t["value"] if not isinstance(t["value"], float)
              else f"{t['value']:.2f}", t["goal"], "yes" if t["met"] else "**no**",
              t["measured"]] for t in results["targets"]]
    return _markdown(["target", "value", "goal", "met", "measured on"], lines)


def levers_table(results: dict) -> str:
    """Levers: in-process variants, client variants and the lever servers (gRPC).

    CPU is per image: this process's for in-process and client rows, the server's processes'
    (at the most callers) for server rows.
    """
    max_c = max((r["concurrency"] for r in results["rows"]), default=1)
    batch = results["floor"]["batch_size"]
    lines = []
    for r in results["levers"]:
        client = r["lever"] == "client channel reuse"
        throughput = "" if client or "throughput_rps" not in r else \
            f"{r['throughput_rps']:.0f} images/s (batch {batch})"
        cpu = r.get("client_cpu_ms") if client else r.get("cpu_ms")
        note = r.get("note", "")
        if r.get("setup_s") is not None and r["lever"] == "graph":
            note = f"setup {r['setup_s']:.1f} s per worker start {note}".strip()
        lines.append([r["lever"], r["variant"], _fmt(r.get("p50_ms")), throughput, _fmt(cpu),
                      note])
    for label, entry in lever_servers_measured(results).items():
        one, many = entry["rows"].get(1), entry["rows"].get(max_c)
        lines.append([
            "server", label, _fmt(one["p50_ms"]) if one else "",
            f"{many['throughput_rps']:.0f} images/s ({max_c} callers)" if many else "",
            _fmt(many.get("server_cpu_ms")) if many else "",
            f"{_fmt(entry['server'].get('log_bytes_per_request'), 0)} log bytes/request",
        ])
    return _markdown(["lever", "variant", "p50 ms (1 image, 1 caller)", "throughput",
                      "CPU ms / image", "note"], lines)


def payload_table(results: dict) -> str:
    lines = [[_bytes(r["payload_bytes"]), r["mode"], _fmt(r["p50_ms"]), _fmt(r["p99_ms"]),
              _fmt(r["throughput_rps"], 0)] for r in results["payload"]]
    return _markdown(["payload", "mode", "p50 ms", "p99 ms", "images/s (1 caller)"], lines)


def _markdown(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def cell(value: object) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _fmt(value: float | None, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:,.{digits}f}"


def report(results: dict) -> str:
    """Every table and finding of a run, as one markdown document."""
    env = results["environment"]
    quick = " (QUICK setting: small counts, not for reporting)" if results["settings"]["quick"] \
        else ""
    parts = [
        "# DigitCNN serving benchmark",
        f"{env['cpus']} CPUs, {env['processor']}, {env['platform']}; torch {env['torch']}, "
        f"TorchServe {env['torchserve']}, grpcio {env['grpcio']}; started {env['started_at']}"
        f"{quick}.",
        "## Findings", "\n".join(f"- {line}" for line in results["findings"]),
        "## Targets", targets_table(results),
        "## Measurements", markdown_table(results),
        "## Cold start and logging", cold_start_table(results),
    ]
    if results["payload"]:
        parts += ["## Payload size", payload_table(results)]
    if results["levers"] or any(s["kind"] == "lever" for s in results["servers"]):
        parts += ["## Levers", levers_table(results)]
    return "\n\n".join(parts) + "\n"


# -- files and figures -------------------------------------------------------------------------
def write_results(results: dict, out_dir: Path) -> dict[str, str]:
    """Write results.json, results.csv, results.md and the figures; return their paths."""
    out_dir = Path(out_dir)
    files = {name: str(out_dir / filename) for name, filename in (
        ("json", RESULTS_JSON), ("csv", RESULTS_CSV), ("markdown", RESULTS_MD),
        ("latency_png", LATENCY_PNG), ("throughput_png", THROUGHPUT_PNG),
        ("payload_png", PAYLOAD_PNG))}
    results = {**results, "files": files}
    Path(files["json"]).write_text(json.dumps(results, indent=1, default=str))
    with open(files["csv"], "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=ROW_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(results["rows"])
    Path(files["markdown"]).write_text(report(results))
    plot_latency(results, save_to=Path(files["latency_png"]))
    plot_throughput(results, save_to=Path(files["throughput_png"]))
    plot_payload(results, save_to=Path(files["payload_png"]))
    return files


def load_results(path: Path = BENCH_DIR / RESULTS_JSON) -> dict:
    """A run's results, as ``run_benchmark`` wrote them."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {path}: run `digitserve bench` (or notebook 07) first.")
    return json.loads(path.read_text())


MODE_STYLE = {GRPC: ("tab:blue", "-"), REST: ("tab:orange", "--"), STREAM: ("tab:green", ":"),
              IN_PROCESS: ("black", "-")}


def _floor_row(results: dict) -> dict | None:
    """The in-process batch-1 row the floor was taken from (its fastest thread count)."""
    return next((r for r in results["rows"] if r["kind"] == "floor" and r["images_per_call"] == 1
                 and r["torch_threads"] == results["floor"]["torch_threads"]), None)


def plot_latency(results: dict, save_to: Path | None = None) -> Figure:
    """Latency distributions (one caller), one panel per main server, the floor in each."""
    servers = list(dict.fromkeys(r["config"] for r in _rows(results)))
    floor = _floor_row(results)
    columns = min(2, max(1, len(servers)))
    rows_n = math.ceil(max(1, len(servers)) / columns)
    fig = Figure(figsize=(6 * columns, 3.6 * rows_n), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows_n, columns, squeeze=False).flatten())
    for ax, label in zip(axes, servers, strict=False):
        curves = ([floor] if floor else []) + [r for r in _rows(results, config=label,
                                                              concurrency=1)]
        for row in curves:
            samples = np.sort(results["samples"].get(row["id"], []))
            if not len(samples):
                continue
            color, style = MODE_STYLE[row["mode"]]
            name = "in-process (floor)" if row["mode"] == IN_PROCESS else row["mode"]
            ax.plot(samples, np.arange(1, len(samples) + 1) / len(samples), style, color=color,
                    label=f"{name}: p50 {row['p50_ms']:.1f}, p99 {row['p99_ms']:.1f} ms")
        ax.set_xscale("log")
        ax.set(title=label, xlabel="latency per image, ms (log scale)",
               ylabel="fraction of requests ≤ x")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8, loc="lower right")
    for ax in axes[len(servers):]:
        ax.set_visible(False)
    fig.suptitle("Latency, one caller at a time: how far each path sits from the in-process "
                 "floor")
    return save_figure(fig, save_to)


def plot_throughput(results: dict, save_to: Path | None = None) -> Figure:
    """Throughput (top) and the server's CPU per request (bottom) against concurrent callers.

    One column per mode; the in-process floors as lines. CPU time is the steadier figure when
    the machine is busy: wall time counts waiting for the CPU, CPU time only using it.
    """
    fig = Figure(figsize=(15, 7.5), layout="constrained")
    axes = fig.subplots(2, len(MODES), sharey="row", sharex=True)
    floor = results["floor"]
    servers = list(dict.fromkeys(r["config"] for r in _rows(results)))
    colors = dict(zip(servers, ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple",
                                "tab:brown"), strict=False))
    concurrencies = sorted({r["concurrency"] for r in _rows(results)}) or [1]
    for column, mode in enumerate(MODES):
        top, bottom = axes[0][column], axes[1][column]
        for label in servers:
            rows = sorted(_rows(results, mode=mode, config=label), key=lambda r: r["concurrency"])
            if not rows:
                continue
            x = [r["concurrency"] for r in rows]
            top.plot(x, [r["throughput_rps"] for r in rows], "o-", color=colors.get(label),
                     label=label)
            cpu = [r.get("server_cpu_ms") for r in rows]
            if all(value is not None for value in cpu):
                bottom.plot(x, cpu, "o-", color=colors.get(label), label=label)
        top.axhline(floor["batch_throughput_rps"], color="black", ls="--", lw=1,
                    label=f"in-process, batch {floor['batch_size']}")
        top.axhline(floor["batch1_throughput_rps"], color="gray", ls=":", lw=1,
                    label="in-process, batch 1")
        floor_cpu = (_floor_row(results) or {}).get("client_cpu_ms")
        if floor_cpu is not None:
            bottom.axhline(floor_cpu, color="gray", ls=":", lw=1, label="in-process, batch 1")
        top.set_title(mode)
        bottom.set_xlabel("concurrent callers")
        for ax in (top, bottom):
            ax.set_xscale("log", base=2)
            ax.set_xticks(concurrencies, [str(c) for c in concurrencies])
            ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("images per second")
    axes[1][0].set_ylabel("server CPU ms per request")
    axes[0][-1].legend(fontsize=8, loc="best")
    fig.suptitle("Throughput and server CPU per request against concurrency "
                 "(TorchServe and the client share this machine)")
    return save_figure(fig, save_to)


def plot_payload(results: dict, save_to: Path | None = None) -> Figure:
    """p50 (and p90) latency against payload size, gRPC and REST: where transport matters."""
    fig = Figure(figsize=(6.5, 4), layout="constrained")
    ax = fig.subplots()
    for mode in (GRPC, REST):
        rows = sorted((r for r in results.get("payload", []) if r["mode"] == mode),
                      key=lambda r: r["payload_bytes"])
        if rows:
            color, style = MODE_STYLE[mode]
            ax.plot([r["payload_bytes"] for r in rows], [r["p50_ms"] for r in rows], "o" + style,
                    color=color, label=f"{mode} p50")
            ax.fill_between([r["payload_bytes"] for r in rows], [r["p50_ms"] for r in rows],
                            [r["p90_ms"] for r in rows], color=color, alpha=0.12,
                            label=f"{mode} p50–p90")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set(xlabel="request payload, bytes (log scale; same digit, padded PNG)",
           ylabel="latency, ms (log scale)", title="Payload size, one caller")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return save_figure(fig, save_to)


def smallest(settings: BenchSettings = QUICK) -> BenchSettings:
    """The smallest run that still touches every path once: for tests."""
    return replace(settings, requests=6, warmup=1, concurrencies=(1, 2), workers=(1,),
                   batching=(True,), batch_size=4, floor_requests=8, images=8,
                   payload_sizes=(10_000,), payload_requests=3, server_levers=False,
                   lever_iterations=3, compile_lever=False)
