"""The benchmark as stages a notebook can run one cell at a time (``BenchRun``), or all at once.

Stages, in the order the lesson runs them (each returns a markdown table of what it measured):
``floor``, ``main_servers``, ``connection_reuse`` (plaintext), ``on_the_wire``,
``payload_and_encoding``, ``many_callers``, ``connection_reuse_tls``, ``deadlines``,
``live_drawing``, ``worst_case``, ``levers``; then ``finish`` writes ``build/bench/``. Only one
TorchServe runs at a time; a stage that needs the server already running reuses it.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from digitserve import archive, config, worst_case
from digitserve.bench import analysis, floor, levers, onwire, servers, situations, tables
from digitserve.bench.load import Measurement, RestCaller
from digitserve.bench.serverlogs import log_bytes
from digitserve.bench.settings import (
    FULL_BENCH,
    TLS_SERVER,
    BenchSettings,
    ServerConfig,
    rsa_certificate,
)
from digitserve.client import DigitClient
from digitserve.live import live_server_settings, measure_live_drawing
from digitserve.server import TorchServe, free_ports

GRPC, REST, IN_PROCESS = servers.GRPC, servers.REST, "in-process"


class BenchRun:
    """One benchmark run: its settings, images, floor model, the server running now, results."""

    def __init__(self, settings: BenchSettings = FULL_BENCH,
                 model_store: Path = config.MODEL_STORE, run_root: Path | None = None,
                 on_start=None) -> None:
        self.settings = settings
        self.mar = archive.require(Path(model_store) / f"{config.ARCHIVE_NAME}.mar")
        self.model_store = Path(model_store)
        self.run_root = Path(run_root) if run_root else config.RUN_DIR / "bench"
        self.on_start = on_start
        self.payloads = floor.bench_images(settings.images)
        self.weights = floor.weights_in(self.mar)
        self.model = floor.InProcess(copy.deepcopy(self.weights), (1, settings.batch_size))
        self.expected = [self.model.digits([p])[0] for p in self.payloads]
        self.server: servers.BenchServer | None = None
        self._certificate = None
        self.results: dict = {
            "settings": json.loads(json.dumps(asdict(settings), default=str)),
            "environment": environment(), "mar": str(self.mar), "rows": [], "servers": [],
            "situations": {}, "levers": [], "samples": {}, "live_drawing": None,
            "worst_case": None, "stages": {},
        }

    # -- servers ----------------------------------------------------------------------------------
    def use(self, server: ServerConfig, kind: str) -> servers.BenchServer:
        """The running server if it is ``server``, else a fresh one (the old one stopped).

        A lever server is measured over gRPC only, so it is warmed up over gRPC only, with
        as many calls as one of its measurements.
        """
        if self.server is not None and self.server.config == server:
            return self.server
        self.close()
        certificate = self.certificate() if server.tls else None
        bench_server = servers.BenchServer(server, self.run_root, self.model_store, certificate,
                                           self.on_start)
        try:
            bench_server.start(self.payloads[0])
            if kind == "lever":
                bench_server.warm_up(self.payloads, self.expected,
                                     min(self.settings.server_warmup,
                                         self.settings.lever_requests),
                                     max(self.settings.concurrencies), protocols=(GRPC,))
            else:
                bench_server.warm_up(self.payloads, self.expected, self.settings.server_warmup,
                                     max(self.settings.concurrencies))
        except BaseException:
            bench_server.stop()
            raise
        self.server = bench_server
        bench_server.entry = {"kind": kind, "label": server.label, **asdict(server),
                              **bench_server.cold_start}
        self.results["servers"].append(bench_server.entry)
        return bench_server

    def certificate(self):
        if self._certificate is None:
            self._certificate = rsa_certificate(self.run_root / "tls")
        return self._certificate

    def close(self) -> None:
        """Stop the running server, if any."""
        if self.server is not None:
            self.server.stop()
            self.server = None

    def _stage(self, name: str, began: float) -> None:
        self.results["stages"][name] = round(time.perf_counter() - began, 1)
        print(f"{name}: measured in {self.results['stages'][name]:.0f} s")

    # -- stages ---------------------------------------------------------------------------------
    def floor(self) -> str:
        """The handler's work in this process, one torch thread and one per CPU."""
        began, s = time.perf_counter(), self.settings
        floors = [floor.measure_floor(self.model, self.payloads, self.expected,
                                      s.floor_requests, s.warmup, s.batch_size, threads)
                  for threads in sorted({1, os.cpu_count() or 1})]
        _add_floor(self.results, floors, s.batch_size)
        self._stage("floor", began)
        return tables.floor_table(self.results)

    def main_servers(self) -> str:
        """gRPC and REST at each concurrency on each main server (the last one left running)."""
        began = time.perf_counter()
        order = sorted(self.settings.main, key=lambda c: c != self.settings.load_server)
        for server_config in order:
            self._rows("main", server_config, self.settings.concurrencies, self.settings.requests)
        self._stage("main servers", began)
        return tables.main_table(self.results)

    def _rows(self, kind: str, server_config: ServerConfig, concurrencies, requests: int,
              protocols=(GRPC, REST)) -> None:
        """Measure a server's rows, and the log bytes TorchServe wrote per request meanwhile."""
        server = self.use(server_config, kind)
        logged = log_bytes(server.run_dir)
        measured = servers.main_rows(server, replace(self.settings, requests=requests,
                                                     concurrencies=tuple(concurrencies)),
                                     self.payloads, self.expected, protocols)
        calls = sum(m.summary()["requests"] for m in measured.values())
        server.entry["log_bytes_per_request"] = round(
            (log_bytes(server.run_dir) - logged) / max(calls, 1), 1)
        for (mode, concurrency), measurement in measured.items():
            _add_row(self.results, kind, mode, server_config, concurrency, measurement)

    def connection_reuse(self) -> str:
        """One caller: one gRPC channel, a new channel per call, REST kept alive or not."""
        return self._reuse(self.settings.main[0], "plaintext")

    def connection_reuse_tls(self) -> str:
        return self._reuse(TLS_SERVER, "tls")

    def _reuse(self, server_config: ServerConfig, key: str) -> str:
        began = time.perf_counter()
        server = self.use(server_config, "situation")
        found = situations.connection_reuse(server, self.payloads, self.expected,
                                            self.settings.reuse_requests)
        self.results["situations"].setdefault("connection_reuse", {})[key] = found
        self._stage(f"connection reuse ({key})", began)
        return tables.reuse_table(self.results, key)

    def on_the_wire(self) -> dict:
        """Record a gRPC and a REST call (two each, on one connection) and take them apart."""
        began = time.perf_counter()
        server = self.use(self.settings.main[0], "situation")
        image = self.payloads[0]

        def grpc_calls(port: int) -> None:
            target = f"{config.HOST}:{port}"
            with DigitClient(target, target, key_file=server.ts.key_file) as client:
                client.predict(image)
                client.predict(image)

        def rest_calls(port: int) -> None:
            caller = RestCaller(port, server.key)
            try:
                caller.answer(image)
                caller.answer(image)
            finally:
                caller.close()

        grpc_recording = onwire.record_calls(server.grpc_port, grpc_calls)
        rest_recording = onwire.record_calls(server.http_port, rest_calls)
        found = {"image_bytes": len(image),
                 "grpc": [onwire.grpc_call_on_wire(grpc_recording, n) for n in (1, 2)],
                 "rest": [onwire.rest_call_on_wire(rest_recording, n) for n in (1, 2)]}
        self.results["situations"]["on_the_wire"] = found
        self._stage("one call on the wire", began)
        return found

    def payload_and_encoding(self) -> str:
        began = time.perf_counter()
        server = self.use(self.settings.main[0], "situation")
        found = self.results["situations"]
        found["payload"] = situations.payload(server, self.settings, self.payloads, self.expected)
        found["encoding"] = situations.encoding(server, self.settings, self.payloads,
                                                self.expected)
        self._stage("payload and encoding", began)
        return tables.payload_table(self.results)

    def many_callers(self) -> str:
        began = time.perf_counter()
        server = self.use(self.settings.load_server, "situation")
        self.results["situations"]["many_callers"] = situations.many_callers(
            server, self.settings, self.payloads, self.expected)
        self._stage("many callers", began)
        return tables.many_callers_table(self.results)

    def deadlines(self) -> str:
        began, s = time.perf_counter(), self.settings
        server = self.use(ServerConfig(f"batching on ({s.batch_size} within "
                                       f"{s.deadline_batch_delay_ms} ms), 1 worker",
                                       batch_size=s.batch_size,
                                       max_batch_delay_ms=s.deadline_batch_delay_ms),
                          "situation")
        self.results["situations"]["deadlines"] = situations.deadlines(server, s,
                                                                       self.payloads[0])
        self._stage("deadlines", began)
        return tables.deadline_table(self.results)

    def live_drawing(self) -> dict:
        """Strokes streamed over StreamPredictions2 against the whole canvas over REST.

        A server of its own serves digitmodel and digitlive (``live.live_server_settings``);
        ``live.measure_live_drawing``'s figures go under "live_drawing" in why_grpc.json.
        """
        self.close()
        began = time.perf_counter()
        live = live_server_settings(ports=free_ports(), run_dir=self.run_root / "live",
                                    model_store=self.model_store)
        with TorchServe(live) as ts:
            if self.on_start:
                self.on_start(ts)
            self.results["live_drawing"] = measure_live_drawing(run_dir=live.run_dir)
        self._stage("live drawing", began)
        return self.results["live_drawing"]

    def worst_case(self) -> str:
        """The costliest requests the kit's input limits allow: time and peak memory.

        ``digitserve.worst_case.measure``: in-process in a fresh interpreter and (full setting)
        through a TorchServe of its own; its figures go under "worst_case" in the results.
        """
        self.close()
        began, s = time.perf_counter(), self.settings
        self.results["worst_case"] = worst_case.measure(
            model_store=self.model_store, repeats=s.worst_case_repeats,
            served=not s.quick, run_dir=self.run_root / "worst-case")
        self._stage("worst case", began)
        return tables.worst_case_table(self.results)

    def levers(self) -> str:
        """In-process levers, then (full setting) a server per lever, over gRPC."""
        began, s = time.perf_counter(), self.settings
        if s.model_levers:
            self.results["levers"] = levers.measure_model_levers(
                self.weights, self.model.handler.model, self.payloads, s)
        if s.server_levers:
            for lever in levers.lever_servers(s.extended_levers):
                self._rows("lever", lever, (1, max(s.concurrencies)), s.lever_requests,
                           protocols=(GRPC,))
            self.close()
        self._stage("levers", began)
        return tables.levers_table(self.results)

    def finish(self, out_dir: Path | None = None) -> dict[str, str]:
        """Stop the server; write why_grpc.json, results.json/.csv/.md and the figures."""
        self.close()
        self.results["environment"]["load_average_end"] = _load_average()
        self.results["why_grpc"] = analysis.why_grpc(self.results)
        self.results["breakdown"] = analysis.breakdown(self.results)
        self.results["findings"] = tables.findings(self.results)
        self.results["files"] = tables.write_results(
            self.results, Path(out_dir or self.settings.out_dir))
        return self.results["files"]


def run_benchmark(settings: BenchSettings = FULL_BENCH, model_store: Path = config.MODEL_STORE,
                  out_dir: Path | None = None, run_root: Path | None = None,
                  on_start=None) -> dict:
    """Every stage in the lesson's order, then the files; returns the results."""
    run = BenchRun(settings, model_store, run_root, on_start)
    try:
        run.floor()
        run.main_servers()
        run.connection_reuse()
        run.on_the_wire()
        run.payload_and_encoding()
        run.many_callers()
        run.connection_reuse_tls()
        run.deadlines()
        run.live_drawing()
        run.worst_case()
        run.levers()
        run.finish(out_dir)
    finally:
        run.close()
    return run.results


def environment() -> dict:
    """The machine and software the figures were measured on."""
    import grpc
    import torchvision

    try:
        from ts.version import __version__ as torchserve_version
    except ImportError:
        torchserve_version = "?"
    return {
        "cpus": os.cpu_count(), "torch_threads_in_process": torch.get_num_threads(),
        "load_average_start": _load_average(), "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(), "torch": torch.__version__,
        "torchvision": torchvision.__version__, "torchserve": torchserve_version,
        "grpcio": grpc.__version__, "started_at": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def _load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _add_floor(results: dict, floors: list[floor.Floor], batch: int) -> None:
    """The floor: the lowest batch-1 p50 and the highest batch throughput over thread counts."""
    summaries = {f.threads: {name: m.summary() for name, m in f.measurements.items()}
                 for f in floors}
    single = min(summaries, key=lambda t: summaries[t]["batch1"]["p50_ms"])
    batched = max(summaries, key=lambda t: summaries[t][f"batch{batch}"]["throughput_rps"])
    results["floor"] = {
        "batch1_p50_ms": summaries[single]["batch1"]["p50_ms"],
        "batch1_throughput_rps": summaries[single]["batch1"]["throughput_rps"],
        "batch_throughput_rps": summaries[batched][f"batch{batch}"]["throughput_rps"],
        "batch_size": batch,
        "preprocess_p50_ms": summaries[single]["preprocess"]["p50_ms"],
        "forward_p50_ms": summaries[single]["forward"]["p50_ms"],
        "torch_threads": single, "batch_torch_threads": batched,
        "by_threads": {t: {"batch1_p50_ms": s["batch1"]["p50_ms"],
                           "batch_throughput_rps": s[f"batch{batch}"]["throughput_rps"]}
                       for t, s in summaries.items()},
    }
    for f in floors:
        for name, images in (("batch1", 1), (f"batch{batch}", batch)):
            server = ServerConfig(f"in-process, {f.threads} torch thread"
                                  f"{'s' if f.threads > 1 else ''}", batch_size=images,
                                  torch_threads=f.threads)
            _add_row(results, "floor", IN_PROCESS, server, 1, f.measurements[name], images)


def _add_row(results: dict, kind: str, mode: str, server: ServerConfig, concurrency: int,
             measurement: Measurement, images: int = 1) -> None:
    summary = measurement.summary()
    floor_ = results["floor"]
    row_id = f"{kind}/{server.slug}/{mode}/{concurrency}/{images}"
    if concurrency == 1:
        results["samples"][row_id] = [round(s * 1000, 3) for s in measurement.latencies_s]
    results["rows"].append({
        "id": row_id, "kind": kind, "config": server.label, "mode": mode,
        "concurrency": concurrency, "images_per_call": images, "workers": server.workers,
        "torch_threads": server.torch_threads, "batch_size": server.batch_size,
        "max_batch_delay_ms": server.max_batch_delay_ms, "logging": server.logging,
        **summary,
        # Latency against one image in-process; throughput against the batched floor.
        "p50_vs_floor": _ratio(summary["p50_ms"], floor_["batch1_p50_ms"]),
        "throughput_vs_floor": _ratio(summary["throughput_rps"], floor_["batch_throughput_rps"]),
    })


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not b or a != a or b != b:
        return None
    return round(a / b, 3)
