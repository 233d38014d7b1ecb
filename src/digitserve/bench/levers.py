"""Levers: what changes the served figures, measured in the same run.

In this process (the forward pass alone): autograd on or off, ``channels_last``, the handler's
TorchScript (trace + freeze) and, when asked, ``torch.compile``; torch threads on the handler's
model. On servers (gRPC, one caller and the most callers): workers × torch threads,
``OMP_WAIT_POLICY=PASSIVE``, and TorchServe's logging (the two log4j2 files shipped here).
"""

from __future__ import annotations

import copy
import logging
import os
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

from digitserve import preprocessing
from digitserve.bench.settings import BenchSettings, ServerConfig
from digitserve.model import for_serving


def lever_servers(extended: bool = False) -> list[ServerConfig]:
    """Batching off: workers × torch threads, and TorchServe's logging turned down.

    "1 worker × 1 torch thread" is the main batching-off server, measured already.
    ``extended`` adds ``OMP_WAIT_POLICY=PASSIVE`` and a second logging set-up (``lean.xml``):
    two more servers, about a minute, for figures that were small in the kit's runs.
    """
    cpus = os.cpu_count() or 1
    servers = []
    for workers in sorted({1, cpus}):
        for threads in sorted({1, cpus}):
            if workers == threads == 1:
                continue
            default = " (TorchServe's own default)" if workers == threads == cpus > 1 else ""
            servers.append(ServerConfig(
                f"{workers} worker{'s' if workers > 1 else ''} × {threads} torch "
                f"thread{'s' if threads > 1 else ''}{default}",
                workers=workers, torch_threads=threads))
    if extended and cpus > 1:
        servers.append(ServerConfig(f"1 worker × {cpus} torch threads, OMP_WAIT_POLICY=PASSIVE",
                                    torch_threads=cpus,
                                    environment=(("OMP_WAIT_POLICY", "PASSIVE"),)))
    setups = (("lean", "log4j2/lean.xml + metrics_mode=prometheus"),) if extended else ()
    for setup, what in (*setups, ("quiet", "log4j2/quiet.xml")):
        servers.append(ServerConfig(f"1 worker × 1 torch thread, logging: {what}",
                                    logging=setup))
    return servers


def measure_model_levers(weights: torch.nn.Module, served: torch.nn.Module,
                         payloads: Sequence[bytes], settings: BenchSettings) -> list[dict]:
    """Forward pass only, batch 1 (p50) and batch ``batch_size`` (images/s), per variant,
    with one torch thread (as in the kit's workers).

    ``weights`` is the eager model, of which each variant prepares its own copy (its setup is
    timed); ``served`` is the handler's model, timed with one torch thread and with one per CPU.
    """
    digits = torch.from_numpy(np.stack([preprocessing.digit_from_payload(p)
                                        for p in payloads[: settings.batch_size]]))
    contiguous = {1: preprocessing.to_model_input(digits[:1]),
                  settings.batch_size: preprocessing.to_model_input(digits)}
    last = {b: x.contiguous(memory_format=torch.channels_last) for b, x in contiguous.items()}
    plain = copy.deepcopy(weights)
    eager_last = copy.deepcopy(weights).to(memory_format=torch.channels_last)

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
        # Inductor imports torch.utils.cpp_extension, which warns "No CUDA runtime is found"
        # when this CUDA build of torch sees a CUDA toolkit but no GPU: true, and beside the
        # point on a CPU.
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
        variants.append(("graph", "torch.compile (inductor) + channels_last",
                         lambda: (torch.compile(eager_last), last, inference)))
    rows = []
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the kit's workers; the thread lever comes after
    try:
        rows += _variants(variants, settings.lever_iterations)
    finally:
        torch.set_num_threads(before)
    for threads in sorted({1, os.cpu_count() or 1}):
        torch.set_num_threads(threads)
        try:
            rows.append({"lever": "torch threads", "variant": f"{threads} thread"
                         + ("s" if threads > 1 else "") + " (the handler's TorchScript)",
                         **_forward_figures(served, last, inference, settings.lever_iterations)})
        finally:
            torch.set_num_threads(before)
    return rows


def _variants(variants: list[tuple[str, str, Callable[[], tuple]]], iterations: int
              ) -> list[dict]:
    rows = []
    for lever, variant, prepare in variants:
        try:
            started = time.perf_counter()
            model, inputs, run = prepare()
            for x in inputs.values():  # warm-up; compiles where there is compiling to do
                for _ in range(3):
                    run(model, x)
            rows.append({"lever": lever, "variant": variant,
                         "setup_s": round(time.perf_counter() - started, 2),
                         **_forward_figures(model, inputs, run, iterations)})
        except Exception as err:  # noqa: BLE001 - a lever that cannot run here is a finding
            rows.append({"lever": lever, "variant": variant,
                         "note": f"unavailable here: {type(err).__name__}: {str(err)[:160]}"})
    return rows


def _forward_figures(model: torch.nn.Module, inputs: dict[int, torch.Tensor], run: Callable,
                     iterations: int) -> dict:
    single, batch = min(inputs), max(inputs)
    times = []
    cpu_started = time.process_time()
    for _ in range(iterations):
        started = time.perf_counter()
        run(model, inputs[single])
        times.append(time.perf_counter() - started)
    cpu = time.process_time() - cpu_started
    rounds = max(1, iterations // batch)
    started = time.perf_counter()
    for _ in range(rounds):
        run(model, inputs[batch])
    batched = rounds * batch / (time.perf_counter() - started)
    return {"p50_ms": round(float(np.percentile(times, 50)) * 1000, 3),
            "throughput_rps": round(batched, 1), "cpu_ms": round(cpu * 1000 / iterations, 3)}
