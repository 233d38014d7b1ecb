"""TorchServe and the two-node Ray Serve cluster, measured side by side in one run (notebook 09).

Both serve the same ``.mar`` with the same work per core: TorchServe with two Python workers
(one per core), the cluster with two replicas (one per one-CPU node); both batch up to 8 requests
that arrive within 5 ms. They run one after the other, never together, and the same
``DigitClient`` calls both over gRPC, and every answer is checked against what the same weights
answer in this process (``mismatches``). Figures per server: cold start (start until the first
answer), p50 for one caller, throughput for 16 callers, and memory after the measurements,
summed over every process of the server (RSS, and PSS, which counts shared pages once:
``cluster.memory_mb``).

``on_paper`` turns the cluster's measured per-replica figures into what more nodes would give on
a bigger machine: an *estimate*, labelled so, never a measurement.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from digitserve import cluster
from digitserve.bench import floor, load
from digitserve.client import DigitClient
from digitserve.config import ARCHIVE_NAME, CLUSTER_RUN_DIR, MODEL_STORE
from digitserve.predictor import DigitPredictor
from digitserve.server import ModelSpec, ServerError, ServerSettings, TorchServe, free_ports


@dataclass(frozen=True)
class SideBySide:
    """How much to measure: ``QUICK`` for CI (figures not for reporting), ``FULL`` otherwise."""

    requests: int = 400
    warmup: int = 50
    concurrency: int = 16
    images: int = 50


FULL = SideBySide()
QUICK = SideBySide(requests=48, warmup=16, images=16)


@dataclass(frozen=True)
class Workload:
    """The digits both servers get, and what the same weights answer in this process."""

    payloads: list[bytes]
    expected: list[int]


def workload(settings: SideBySide, model_store: Path = MODEL_STORE) -> Workload:
    """The same test digits for both servers; a server that answers otherwise mismatches."""
    payloads = floor.bench_images(settings.images)
    mar = Path(model_store) / f"{ARCHIVE_NAME}.mar"
    return Workload(payloads, [answer["digit"] for answer in DigitPredictor(mar).predict(payloads)])


def start_cluster(payload: bytes, settings: cluster.ClusterSettings | None = None) -> dict:
    """``cluster.start``, then one prediction: its status, with ``first_answer_s``.

    The cluster's cold start, from the start command to the first answer, measured the way
    ``measure_torchserve`` measures TorchServe's.
    """
    settings = settings or cluster.ClusterSettings()
    began = time.perf_counter()
    report = cluster.start(settings)
    with cluster.client(settings.run_dir, deadline_s=60) as client:
        client.predict(payload)
    return {**report, "first_answer_s": round(time.perf_counter() - began, 2)}


def measure_cluster(settings: SideBySide, work: Workload, first_answer_s: float,
                    run_dir: Path = CLUSTER_RUN_DIR) -> dict:
    """Measure the running cluster (two replicas batching like TorchServe's workers)."""
    if not cluster.status(run_dir, describe=False).get("running"):
        raise ServerError(f"no cluster runs from {run_dir}: start it first (`start_cluster`).")
    with cluster.client(run_dir) as client:
        figures = _measure_server(client, work.payloads, work.expected, settings)
    state = cluster.status(run_dir)
    replica_pss = [cluster.memory_mb([psutil.Process(r["pid"])])[1]
                   for r in state.get("replicas", [])
                   if r.get("pid") and psutil.pid_exists(r["pid"])]
    return {**figures, "cold_start_s": first_answer_s, "rss_mb": state["rss_mb"],
            "pss_mb": state["pss_mb"], "processes": state["processes"],
            "replica_pss_mb": replica_pss, "nodes": [n["name"] for n in state.get("nodes", [])],
            "replica_nodes": [r["node"] for r in state.get("replicas", [])]}


def measure_torchserve(settings: SideBySide, work: Workload, run_root: Path,
                       model_store: Path = MODEL_STORE) -> dict:
    """Start TorchServe as the cluster serves (two workers, the same batching), measure, stop."""
    defaults = cluster.ClusterSettings()
    spec = ModelSpec(batch_size=defaults.max_batch_size, workers=defaults.replicas,
                     max_batch_delay_ms=round(defaults.batch_wait_timeout_s * 1000))
    began = time.perf_counter()
    with TorchServe(ServerSettings(ports=free_ports(), run_dir=Path(run_root) / "torchserve",
                                   model_store=Path(model_store), models=(spec,))) as ts:
        with DigitClient.for_run_dir(ts.run_dir) as client:
            client.predict(work.payloads[0])
            cold = time.perf_counter() - began
            figures = _measure_server(client, work.payloads, work.expected, settings)
        rss, pss = cluster.memory_mb(_group(ts.process.pid))
    return {**figures, "cold_start_s": round(cold, 2), "rss_mb": rss, "pss_mb": pss}


def side_by_side(settings: SideBySide, torchserve: dict, on_cluster: dict,
                 load_average: list[float]) -> dict:
    """Both servers' figures, the settings they share, and the estimate on paper."""
    defaults = cluster.ClusterSettings()
    return {"settings": vars(settings) | {"workers": defaults.replicas,
                                          "batch_size": defaults.max_batch_size,
                                          "batch_delay_ms": defaults.batch_wait_timeout_s * 1000},
            "load_average": load_average, "torchserve": torchserve, "cluster": on_cluster,
            "estimate": on_paper(on_cluster)}


def _measure_server(client: DigitClient, payloads: list[bytes], expected: list[int],
                    settings: SideBySide) -> dict:
    figures = {}
    for name, concurrency in (("one_caller", 1), ("callers", settings.concurrency)):
        measured = load.drive(lambda: load.shared_client_caller(client), payloads, expected,
                              settings.requests, concurrency, settings.warmup)
        figures[name] = measured.summary()
    return {"p50_ms_one_caller": figures["one_caller"]["p50_ms"],
            "throughput_rps_16": figures["callers"]["throughput_rps"],
            "p50_ms_16": figures["callers"]["p50_ms"],
            "errors": figures["one_caller"]["errors"] + figures["callers"]["errors"],
            "mismatches": figures["one_caller"]["mismatches"] + figures["callers"]["mismatches"]}


def on_paper(measured: dict, nodes: tuple[int, ...] = (2, 4, 8), cores_per_node: int = 8
             ) -> dict:
    """An ESTIMATE of bigger clusters from the measured per-replica figures (one replica/core).

    Throughput: per-replica throughput times replicas, an upper bound: it assumes the work per
    call stays the same, a proxy on every node (``proxy_location="EveryNode"``) behind a load
    balancer, and no other limit (network, client). Memory (PSS): the measured cluster less its
    replicas is the overhead of two nodes; each node adds half of it, each replica its own.
    """
    replicas_now = max(len(measured.get("replica_pss_mb") or []), 1)
    per_replica_rps = measured["throughput_rps_16"] / replicas_now
    replica_mb = (sum(measured["replica_pss_mb"]) / replicas_now
                  if measured.get("replica_pss_mb") else math.nan)
    per_node_mb = (measured["pss_mb"] - replica_mb * replicas_now) / 2
    rows = [{"nodes": n, "replicas": n * cores_per_node,
             "throughput_rps": round(per_replica_rps * n * cores_per_node),
             "memory_gb": round((per_node_mb * n + replica_mb * n * cores_per_node) / 1024, 1)}
            for n in nodes]
    return {"label": "estimate on paper from the measured per-replica figures, not a measurement",
            "cores_per_node": cores_per_node, "per_replica_rps": round(per_replica_rps, 1),
            "replica_mb": round(replica_mb, 1), "node_overhead_mb": round(per_node_mb, 1),
            "rows": rows}


def _group(pid: int) -> list[psutil.Process]:
    """Every live process of TorchServe's process session (launcher, Java, workers)."""
    import os

    found = []
    for process in psutil.process_iter():
        try:
            if os.getpgid(process.pid) == pid:
                found.append(process)
        except (ProcessLookupError, psutil.Error):
            continue
    return found


def replica_killed_under_load(run_dir: Path, payloads: list[bytes], calls: int = 160,
                              callers: int = 16, replaced_within_s: float = 300) -> dict:
    """SIGKILL one replica of the cluster while ``callers`` threads make ``calls`` predictions.

    Every call should still answer, and answer right (the client sends a prediction caught
    in the replica's death once more, ``DigitClient._retry``); Serve then starts a new
    replica. Returns what
    happened: answers, wrong answers, failures, the killed pid, and whether (and how fast) the
    deployment was back to its replicas.
    """
    import os
    import signal
    import threading

    before = cluster.status(run_dir)
    victim = before["replicas"][0]
    answers, failures, lock = [], [], threading.Lock()
    numbers = iter(range(calls))
    with cluster.client(run_dir, deadline_s=60) as client:
        expected = [client.predict(payload).digit for payload in payloads]

        def caller() -> None:
            for n in numbers:
                index = n % len(payloads)
                try:
                    digit = client.predict(payloads[index]).digit
                    with lock:
                        answers.append(digit == expected[index])
                except Exception as err:  # noqa: BLE001 - every failure is the finding
                    with lock:
                        failures.append(f"{type(err).__name__}: {err}")

        threads = [threading.Thread(target=caller, daemon=True) for _ in range(callers)]
        for thread in threads:
            thread.start()
        while len(answers) < callers and not failures and any(t.is_alive() for t in threads):
            time.sleep(0.02)
        os.kill(victim["pid"], signal.SIGKILL)
        killed_at = time.monotonic()
        for thread in threads:
            thread.join(timeout=600)
    replaced_after = None
    while time.monotonic() - killed_at < replaced_within_s:
        replicas = cluster.status(run_dir).get("replicas", [])
        if (len(replicas) == len(before["replicas"])
                and {r["state"] for r in replicas} == {"RUNNING"}
                and victim["pid"] not in {r["pid"] for r in replicas}):
            replaced_after = round(time.monotonic() - killed_at, 1)
            break
        time.sleep(1)
    return {"calls": calls, "callers": callers, "answered": len(answers),
            "wrong": answers.count(False), "failures": failures, "killed_pid": victim["pid"],
            "killed_on": victim["node"], "replaced_after_s": replaced_after}
