"""The in-process floor: the handler's own code on the same images, with no server in between.

``InProcess`` runs the very functions TorchServe's worker runs for a batch (``handler.read_batch``,
``DigitHandler.predict_probabilities`` and ``DigitHandler.answer``) on the weights inside the
.mar, prepared as the handler prepares them (``model.for_serving``). No server on the same CPU
can be faster; everything a server adds shows up as the distance to this floor.
"""

from __future__ import annotations

import io
import json
import logging
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from digitserve import data, evaluate, preprocessing, synthetic
from digitserve.bench.load import Measurement
from digitserve.model import DigitCNN, for_serving


def _quiet_import_handler():
    """``digitserve.handler`` without TorchServe's import-time warnings about optional
    backends (OpenVINO, onnxruntime, TensorRT) that the kit does not use."""
    logger = logging.getLogger("ts.torch_handler.base_handler")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        from digitserve import handler
    finally:
        logger.setLevel(level)
    return handler


handler = _quiet_import_handler()


def bench_images(n: int) -> list[bytes]:
    """The first ``n`` MNIST test digits as PNG bytes (a few hundred bytes each)."""
    data.ensure_mnist()
    images, _ = data.load_split(train=False)
    return [synthetic.png(image.numpy()) for image in images[:n]]


def padded_png(png: bytes, size: int) -> bytes:
    """The same PNG grown to ``size`` bytes by a private ancillary chunk that decoders skip.

    The image, and so the work of decoding and classifying it, stays the same: only the bytes
    on the wire grow. A ``size`` smaller than the PNG returns it unchanged.
    """
    import zlib

    extra = size - len(png) - 12  # a chunk is length (4) + type (4) + body + CRC (4)
    if extra < 0:
        return png
    body = bytes(extra)
    kind = b"dsPd"  # lowercase first letter: ancillary; lowercase second: private
    chunk = (len(body).to_bytes(4, "big") + kind + body
             + zlib.crc32(kind + body).to_bytes(4, "big"))
    header_end = 8 + 25  # signature, then the IHDR chunk (13-byte body)
    return png[:header_end] + chunk + png[header_end:]


def weights_in(mar: Path) -> DigitCNN:
    """DigitCNN (eager) with the very weights inside ``mar``."""
    with zipfile.ZipFile(mar) as archive:
        manifest = json.loads(archive.read("MAR-INF/MANIFEST.json"))
        weights = archive.read(manifest["model"]["serializedFile"])
    return evaluate.load_model(io.BytesIO(weights))


class InProcess:
    """The handler's work for a batch, in this process: PNG bytes in, JSON answers out."""

    def __init__(self, model: DigitCNN, batch_sizes: Sequence[int] = (1,)) -> None:
        self.handler = handler.DigitHandler()
        self.handler.device = torch.device("cpu")
        self.handler.version = ""
        self.handler.model = for_serving(model, preprocessing.IMAGE_SIZE,
                                         batch_sizes=batch_sizes)

    def __call__(self, payloads: Sequence[bytes]) -> list[dict]:
        digits, errors = handler.read_batch([{"data": payload} for payload in payloads])
        if errors:
            raise ValueError(f"the floor could not read its images: {errors}")
        batch = torch.from_numpy(np.stack([digits[i] for i in sorted(digits)]))
        probabilities = self.handler.predict_probabilities(batch)
        return [self.handler.answer(row) for row in probabilities.tolist()]

    def digits(self, payloads: Sequence[bytes]) -> list[int]:
        return [answer["digit"] for answer in self(payloads)]


@dataclass
class Floor:
    """The floor's measurements: batch 1, batch ``batch_size``, and batch 1's two halves."""

    threads: int
    measurements: dict[str, Measurement]


def measure_floor(model: InProcess, payloads: Sequence[bytes], expected: Sequence[int],
                  requests: int, warmup: int, batch_size: int, threads: int) -> Floor:
    """Time the floor with ``threads`` torch threads (this process's setting is restored)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = {}
        for batch in (1, batch_size):
            calls = max(1, requests // batch)
            latencies, mismatches, cpu = [], 0, 0.0
            for index in range(calls + warmup):
                group = [(index * batch + i) % len(payloads) for i in range(batch)]
                cpu_started, started = time.process_time(), time.perf_counter()
                digits = model.digits([payloads[i] for i in group])
                elapsed = time.perf_counter() - started
                if index >= warmup:
                    latencies.append(elapsed)
                    cpu += time.process_time() - cpu_started
                    mismatches += sum(d != expected[i] for d, i in zip(digits, group, strict=True))
            out[f"batch{batch}"] = Measurement(latencies, sum(latencies), images_per_call=batch,
                                               mismatches=mismatches, client_cpu_s=cpu)
        out.update(_halves(model, payloads, min(requests, 200), warmup))
        return Floor(threads, out)
    finally:
        torch.set_num_threads(before)


def _halves(model: InProcess, payloads: Sequence[bytes], n: int, warmup: int
            ) -> dict[str, Measurement]:
    """Batch 1 split where the handler's work splits: reading the image, then the model."""
    prepare, forward = [], []
    for index in range(n + warmup):
        started = time.perf_counter()
        digits, _ = handler.read_batch([{"data": payloads[index % len(payloads)]}])
        batch = torch.from_numpy(digits[0])[None]
        middle = time.perf_counter()
        model.handler.predict_probabilities(batch)
        if index >= warmup:
            prepare.append(middle - started)
            forward.append(time.perf_counter() - middle)
    return {"preprocess": Measurement(prepare, sum(prepare)),
            "forward": Measurement(forward, sum(forward))}
