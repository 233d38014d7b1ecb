"""One TorchServe started for the benchmark, and what every measurement needs from it.

``BenchServer`` starts a ``ServerConfig`` fresh in its own run directory on free ports, times its
cold start, warms it up (the Java frontend compiles its hot paths only after many calls), and
hands out callers (gRPC on the shared channel, REST kept alive or not, plaintext or TLS), the
server's CPU meter and log windows. ``main_rows`` measures gRPC and REST at each concurrency.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from digitserve import config
from digitserve.bench import load, serverlogs
from digitserve.bench.settings import CALL_DEADLINE_S, BenchSettings, ServerConfig, server_settings
from digitserve.client import DigitClient, Prediction, read_key
from digitserve.grpc_stubs import inference_pb2
from digitserve.server import TorchServe
from digitserve.tls import Certificate

GRPC, REST = "grpc", "rest"


class BenchServer:
    """A fresh TorchServe for one ``ServerConfig``; a context manager that always stops it."""

    def __init__(self, server: ServerConfig, run_root: Path, model_store: Path,
                 certificate: Certificate | None = None,
                 on_start: Callable[[TorchServe], None] | None = None) -> None:
        self.config = server
        self.run_dir = Path(run_root) / server.slug
        self.model_store = Path(model_store)
        self.certificate = certificate
        self.on_start = on_start
        self.ts: TorchServe | None = None
        self.client: DigitClient | None = None
        self.cold_start: dict = {}
        #: This server's entry in the results' "servers" list (set by whoever records it).
        self.entry: dict = {}

    def start(self, probe: bytes) -> BenchServer:
        """Start, then time the first prediction (of ``probe``): the cold start."""
        shutil.rmtree(self.run_dir, ignore_errors=True)  # the logs of an earlier run
        self.ts = TorchServe(server_settings(self.config, self.run_dir, self.model_store,
                                             self.certificate))
        began = time.perf_counter()
        self.ts.start(timeout_s=config.STARTUP_TIMEOUT_S)
        ready = time.perf_counter() - began
        if self.on_start:
            self.on_start(self.ts)
        self.client = DigitClient.for_run_dir(self.run_dir, deadline_s=CALL_DEADLINE_S)
        self.client.predict(probe)
        first = time.perf_counter() - began
        self.cold_start = {"ready_s": round(ready, 3), "first_prediction_s": round(first, 3),
                           "first_request_ms": round((first - ready) * 1000, 1)}
        self.key = read_key(self.ts.key_file, "inference")
        self.metadata = (("authorization", f"Bearer {self.key}"),)
        return self

    def stop(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
        if self.ts is not None:
            self.ts.stop()
            self.ts = None

    def __enter__(self) -> BenchServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- what measurements use ----------------------------------------------------------------
    @property
    def grpc_port(self) -> int:
        return self.ts.settings.ports.grpc_inference

    @property
    def http_port(self) -> int:
        return self.ts.settings.ports.http_inference

    @property
    def tls_cert(self) -> Path | None:
        return self.certificate.cert if self.config.tls and self.certificate else None

    def server_cpu(self) -> float:
        return load.server_cpu_seconds(self.ts.process.pid)

    def window(self) -> serverlogs.LogWindow:
        return serverlogs.LogWindow(self.run_dir)

    def grpc_call(self, image: bytes, timeout_s: float = CALL_DEADLINE_S) -> int:
        """One Predictions on the shared channel, with the token read once (as REST's)."""
        request = inference_pb2.PredictionsRequest(model_name=config.MODEL_NAME,
                                                   input={"data": image})
        reply = self.client.inference.Predictions(request, timeout=timeout_s,
                                                  metadata=self.metadata)
        return Prediction.from_json(reply.prediction).digit

    def callers(self) -> dict[str, Callable[[], load.Caller]]:
        """Factories of the callers for the main measurements, by protocol."""
        return {GRPC: lambda: self.grpc_call,
                REST: lambda: load.RestCaller(self.http_port, self.key, tls_cert=self.tls_cert)}

    def warm_up(self, payloads: Sequence[bytes], expected: Sequence[int], calls: int,
                concurrency: int, protocols: Sequence[str] = (GRPC, REST)) -> None:
        """Untimed calls of each protocol, at the most callers the measurements will use."""
        for mode, make in self.callers().items():
            if mode in protocols:
                load.drive(make, payloads, expected, calls, concurrency)


def main_rows(server: BenchServer, settings: BenchSettings, payloads: Sequence[bytes],
              expected: Sequence[int], protocols: Sequence[str] = (GRPC, REST)
              ) -> dict[tuple[str, int], load.Measurement]:
    """Each protocol at every concurrency, interleaved so that a drift touches all alike."""
    out = {}
    for concurrency in settings.concurrencies:
        for mode, make in server.callers().items():
            if mode not in protocols:
                continue
            out[(mode, concurrency)] = load.drive(make, payloads, expected, settings.requests,
                                                  concurrency, settings.warmup,
                                                  server.server_cpu)
    return out
