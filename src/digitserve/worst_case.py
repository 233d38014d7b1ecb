"""The most one request can cost the server: time and peak memory at the kit's input limits.

Every size a request states is checked before anything is built from it (see ``handler`` and
``preprocessing.MAX_IMAGE_PIXELS``), so one request's cost has a ceiling. This module builds
the most expensive requests those limits and the 4 MiB message limit allow, one per input
format, and measures each:

- in-process: the handler's own steps (``handler.read_batch``, then the forward pass of a
  DigitCNN prepared as the handler prepares it) in a fresh Python process, whose peak resident
  memory (``VmHWM``) is reset before each request;
- through TorchServe: a server of its own (one worker, batching off, the Open Inference Protocol
  on) on free ports, the worker's peak RSS read the same way from ``/proc/<pid>/status``.

Peak memory is read from Linux's ``/proc``; elsewhere the peak figures are None.

    from digitserve import worst_case
    result = worst_case.measure()   # a few minutes; see ``measure`` for the dict it returns
"""

from __future__ import annotations

import io
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from digitserve import preprocessing
from digitserve.config import MAX_MESSAGE_BYTES, MODEL_NAME, MODEL_STORE

#: The side of the square images built at the limit (2048 for the kit's 2048×2048).
SIDE = int(preprocessing.MAX_IMAGE_PIXELS ** 0.5)
#: Room left in a request for everything but the image (the client's own margin).
REQUEST_OVERHEAD_BYTES = 4096
MB = 1024 * 1024


def ink_pattern(width: int, height: int, ink: int = 255) -> np.ndarray:
    """A grid of 3-pixel lines every 16 pixels on a dark ground: ink from edge to edge, so the
    digit's box is almost the whole image (the costliest case for the steps that follow), and
    it compresses well."""
    pattern = np.zeros((height, width), dtype=np.uint8)
    for offset in range(8, 11):
        pattern[offset::16, :] = ink
        pattern[:, offset::16] = ink
    return pattern


def _encode(image: Image.Image, image_format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **options)
    return buffer.getvalue()


def _png_rgba() -> bytes:
    alpha = ink_pattern(SIDE, SIDE)
    rgba = np.zeros((SIDE, SIDE, 4), dtype=np.uint8)
    rgba[..., 3] = alpha
    return _encode(Image.fromarray(rgba, "RGBA"), "PNG")


def _png_gray16() -> bytes:
    return _encode(Image.fromarray(ink_pattern(SIDE, SIDE).astype(np.uint16) * 257), "PNG")


def _tiff_float() -> bytes:
    pixels = ink_pattern(SIDE, SIDE).astype(np.float32)
    return _encode(Image.fromarray(pixels, "F"), "TIFF", compression="tiff_adobe_deflate")


def _jpeg() -> bytes:
    gray = ink_pattern(SIDE, SIDE)
    return _encode(Image.fromarray(np.dstack([gray] * 3)), "JPEG", quality=90, progressive=True)


def _gif() -> bytes:
    image = Image.fromarray(ink_pattern(SIDE, SIDE)).convert("P")
    return _encode(image, "GIF", transparency=0)


def _webp() -> bytes:
    rgba = np.zeros((SIDE, SIDE, 4), dtype=np.uint8)
    rgba[..., 3] = ink_pattern(SIDE, SIDE)
    return _encode(Image.fromarray(rgba, "RGBA"), "WEBP", lossless=True, method=0)


def _bmp() -> bytes:
    """The largest uncompressed 8-bit BMP under the message limit (its header + 1 byte/pixel)."""
    side = int((MAX_MESSAGE_BYTES - REQUEST_OVERHEAD_BYTES - 2048) ** 0.5) // 4 * 4
    return _encode(Image.fromarray(ink_pattern(side, side)), "BMP")


def _json_pixels() -> bytes:
    """The largest JSON pixel list (rows of 0 and 255) under the message limit."""
    def text(side: int) -> bytes:
        return json.dumps(ink_pattern(side, side).tolist(), separators=(",", ":")).encode()

    per_pixel = len(text(256)) / 256**2
    side = min(SIDE, int(((MAX_MESSAGE_BYTES - REQUEST_OVERHEAD_BYTES) / per_pixel) ** 0.5))
    side -= side % 16
    while len(pixels := text(side)) > MAX_MESSAGE_BYTES - REQUEST_OVERHEAD_BYTES:
        side -= 16
    return pixels


def _over_the_limit() -> bytes:
    return _encode(Image.fromarray(ink_pattern(SIDE + 1, SIDE)), "PNG")


def oip_tensor(name: str) -> dict:
    """An OIP input tensor (the fields of ``InferInputTensor``) for one of the OIP cases."""
    if name == "oip_uint8":  # one byte a value on the wire (values under 128): the most pixels
        side = int((MAX_MESSAGE_BYTES - REQUEST_OVERHEAD_BYTES) ** 0.5) // 8 * 8
        side = min(side, SIDE)
        values = ink_pattern(side, side, ink=127).ravel().tolist()
        return {"datatype": "UINT8", "shape": [1, side, side], "values": values}
    if name == "oip_empty_rows":  # a 40-byte request whose shape once built 20 M empty lists
        return {"datatype": "UINT8", "shape": [20_000_000, 0], "values": []}
    raise KeyError(name)


#: name -> (what it is, how to build its bytes); the OIP cases are built by ``oip_tensor``.
IMAGE_CASES: dict[str, tuple[str, Callable[[], bytes]]] = {
    "png_rgba": (f"RGBA PNG {SIDE}×{SIDE}, ink by transparency", _png_rgba),
    "png_gray16": (f"16-bit grey PNG {SIDE}×{SIDE}", _png_gray16),
    "tiff_float": (f"32-bit float TIFF {SIDE}×{SIDE}, deflate", _tiff_float),
    "jpeg": (f"progressive JPEG {SIDE}×{SIDE}", _jpeg),
    "gif": (f"GIF {SIDE}×{SIDE} with transparency", _gif),
    "webp": (f"lossless RGBA WebP {SIDE}×{SIDE}", _webp),
    "bmp": ("the largest 8-bit BMP under 4 MiB", _bmp),
    "json_pixels": ("the largest JSON pixel rows under 4 MiB", _json_pixels),
    "over_the_limit": (f"PNG {SIDE + 1}×{SIDE}: one column over the limit, refused",
                       _over_the_limit),
}
OIP_CASES = {
    "oip_uint8": ("OIP UINT8 pixel tensor, the most values 4 MiB holds", "oip_uint8"),
    "oip_empty_rows": ("OIP shape [20000000, 0] with no values, refused", "oip_empty_rows"),
}
CASES = (*IMAGE_CASES, *OIP_CASES)


def build_request(name: str) -> dict:
    """The request as the handler receives it: ``{"data": bytes}`` or an OIP ``{"body": ...}``."""
    if name in IMAGE_CASES:
        return {"data": IMAGE_CASES[name][1]()}
    tensor = oip_tensor(name)
    return {"body": {"id": "", "model_name": MODEL_NAME, "inputs": [{
        "name": "image", "datatype": tensor["datatype"], "shape": tensor["shape"],
        "data": tensor["values"]}]}}


def grpc_request(name: str):
    """The gRPC request for a case: ``PredictionsRequest`` or OIP ``ModelInferRequest``."""
    from digitserve.grpc_stubs import inference_pb2
    from digitserve.grpc_stubs import open_inference_grpc_pb2 as oip_pb2

    if name in IMAGE_CASES:
        return inference_pb2.PredictionsRequest(model_name=MODEL_NAME,
                                                input={"data": IMAGE_CASES[name][1]()})
    tensor = oip_tensor(name)
    return oip_pb2.ModelInferRequest(model_name=MODEL_NAME, inputs=[
        oip_pb2.ModelInferRequest.InferInputTensor(
            name="image", datatype=tensor["datatype"], shape=tensor["shape"],
            contents=oip_pb2.InferTensorContents(uint_contents=tensor["values"]))])


# -- peak memory, from /proc --------------------------------------------------------------------
def _status_kb(pid: int | str, field: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak(pid: int | str) -> bool:
    """Reset a process's peak RSS (Linux: ``clear_refs`` 5); False where that is not possible."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as clear:
            clear.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """The rise of a process's peak RSS over its RSS at the start of a ``with`` block, in MiB."""

    def __init__(self, pid: int | str = "self") -> None:
        self.pid, self.rise_mb, self.rss_mb = pid, None, None

    def __enter__(self) -> PeakMemory:
        self._ok = _reset_peak(self.pid)
        self._before = _status_kb(self.pid, "VmRSS")
        return self

    def __exit__(self, *exc: object) -> None:
        peak = _status_kb(self.pid, "VmHWM")
        if self._ok and peak is not None and self._before is not None:
            self.rise_mb = round(max(peak - self._before, 0) / 1024, 1)
            self.rss_mb = round(self._before / 1024, 1)


# -- in-process ---------------------------------------------------------------------------------
def _in_process_main(repeats: int, cases: tuple[str, ...] = CASES) -> None:
    """Run in a fresh interpreter: the handler's steps for every case; JSON on stdout."""
    import gc

    import torch

    from digitserve import handler
    from digitserve.model import DigitCNN, for_serving

    torch.set_num_threads(1)  # as each TorchServe worker runs (``ServerSettings.torch_threads``)
    torch.manual_seed(0)
    model = for_serving(DigitCNN(), preprocessing.IMAGE_SIZE)

    def one(request: dict) -> str:
        digits, errors = handler.read_batch([request])
        if errors:
            return "INVALID_ARGUMENT"
        with torch.inference_mode():
            batch = preprocessing.to_model_input(torch.from_numpy(np.stack([digits[0]])))
            logits = model(batch.contiguous(memory_format=torch.channels_last))
        return f"digit {int(logits.argmax())}"

    one({"data": _encode(Image.fromarray(ink_pattern(64, 64)), "PNG")})  # warm every path
    results = {}
    for name in cases:
        request = build_request(name)
        times, rises, answer = [], [], ""
        for _ in range(repeats):
            gc.collect()
            with PeakMemory() as peak:
                started = time.perf_counter()
                answer = one(request)
                times.append((time.perf_counter() - started) * 1000)
            rises.append(peak.rise_mb)
        results[name] = {"answer": answer, "ms": round(statistics.median(times), 1),
                         "peak_rise_mb": None if None in rises else max(rises)}
    print(json.dumps(results))


def measure_in_process(repeats: int = 3, cases: Sequence[str] = CASES) -> dict[str, dict]:
    """``{case: {"answer", "ms", "peak_rise_mb"}}`` from a fresh Python process."""
    unknown = set(cases) - set(CASES)
    if unknown:
        raise KeyError(f"unknown cases {sorted(unknown)}; the cases are {', '.join(CASES)}")
    out = subprocess.run(
        [sys.executable, "-c", f"from digitserve import worst_case; "
                               f"worst_case._in_process_main({int(repeats)}, {tuple(cases)!r})"],
        capture_output=True, text=True, check=False, timeout=1800,
    )
    if out.returncode != 0:
        raise RuntimeError(f"the in-process measurement failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- through TorchServe -------------------------------------------------------------------------
def measure_served(model_store: Path = MODEL_STORE, repeats: int = 3,
                   cases: Sequence[str] = CASES, run_dir: Path | None = None) -> dict[str, dict]:
    """``{case: {"answer", "ms", "peak_rise_mb", "worker_rss_mb", "same_worker"}}`` measured
    through a TorchServe of its own, started and stopped here (in ``run_dir``, default a
    temporary folder)."""
    import grpc
    import psutil

    from digitserve import archive, oip
    from digitserve.client import read_key
    from digitserve.grpc_stubs import inference_pb2, inference_pb2_grpc
    from digitserve.grpc_stubs import open_inference_grpc_pb2_grpc as oip_grpc
    from digitserve.server import ModelSpec, ServerSettings, TorchServe, free_ports

    archive.require(Path(model_store) / archive.ARCHIVE_PATH.name)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="digitserve-worst-") as temporary:
        settings = ServerSettings(ports=free_ports(), run_dir=Path(run_dir or temporary),
                                  model_store=Path(model_store), models=(ModelSpec(),),
                                  extra_properties=oip.OIP_PROPERTIES)
        with TorchServe(settings) as server:
            target = f"127.0.0.1:{settings.ports.grpc_inference}"
            metadata = (("authorization", f"Bearer {read_key(server.key_file, 'inference')}"),)
            channel = grpc.insecure_channel(target, options=[
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.enable_http_proxy", 0)])
            inference = inference_pb2_grpc.InferenceAPIsServiceStub(channel)
            infer = oip_grpc.GRPCInferenceServiceStub(channel)

            def worker_pid() -> int | None:
                for proc in psutil.Process(server.process.pid).children(recursive=True):
                    if "model_service_worker" in " ".join(proc.cmdline()):
                        return proc.pid
                return None

            def call(request) -> str:
                try:
                    if isinstance(request, inference_pb2.PredictionsRequest):
                        reply = inference.Predictions(request, timeout=120, metadata=metadata)
                        return f"digit {json.loads(reply.prediction)['digit']}"
                    reply = infer.ModelInfer(request, timeout=120, metadata=metadata)
                    digit = next(o for o in reply.outputs if o.name == "digit")
                    return f"digit {digit.contents.int64_contents[0]}"
                except grpc.RpcError as err:
                    return err.code().name

            call(grpc_request("png_gray16"))  # a worker's first request costs more: not counted
            try:
                for name in cases:
                    pid, request = worker_pid(), grpc_request(name)
                    times, rises, answer, rss = [], [], "", None
                    for _ in range(repeats):
                        with PeakMemory(pid) as peak:
                            started = time.perf_counter()
                            answer = call(request)
                            times.append((time.perf_counter() - started) * 1000)
                        rises.append(peak.rise_mb)
                        rss = peak.rss_mb
                    results[name] = {
                        "answer": answer, "ms": round(statistics.median(times), 1),
                        "peak_rise_mb": None if None in rises else max(rises),
                        "worker_rss_mb": rss, "same_worker": worker_pid() == pid,
                    }
            finally:
                channel.close()
    return results


def measure(model_store: Path = MODEL_STORE, repeats: int = 3, served: bool = True,
            cases: Sequence[str] = CASES, run_dir: Path | None = None) -> dict:
    """The worst-case time and peak memory of one request, per case and overall.

    Returns::

        {"limit_pixels": 4194304, "max_request_bytes": 4194304, "repeats": 3,
         "cases": [{"case", "description", "grpc_request_bytes",
                    "in_process_answer", "in_process_ms", "in_process_peak_rise_mb",
                    "served_answer", "served_ms", "worker_peak_rise_mb", "worker_rss_mb",
                    "same_worker"}, ...],
         "worst": {"in_process_ms", "in_process_peak_rise_mb", "served_ms",
                   "worker_peak_rise_mb", "worker_rss_mb", "cases": {figure: case}}}

    Times are medians of ``repeats`` calls (milliseconds, one torch thread); a peak rise is the
    largest over those calls of (peak RSS during the call − RSS before it), in MiB. The served
    figures need ``model_store`` to hold the kit's archive; ``served=False`` skips them (their
    keys are then None). ``cases`` picks some of ``CASES``; the server runs in ``run_dir``
    (default: a temporary folder).
    """
    in_process = measure_in_process(repeats, cases)
    through = measure_served(model_store, repeats, cases, run_dir) if served else {}
    rows = []
    for name in cases:
        description = IMAGE_CASES[name][0] if name in IMAGE_CASES else OIP_CASES[name][0]
        size = grpc_request(name).ByteSize()
        mine, theirs = in_process[name], through.get(name, {})
        rows.append({
            "case": name, "description": description, "grpc_request_bytes": size,
            "in_process_answer": mine["answer"], "in_process_ms": mine["ms"],
            "in_process_peak_rise_mb": mine["peak_rise_mb"],
            "served_answer": theirs.get("answer"), "served_ms": theirs.get("ms"),
            "worker_peak_rise_mb": theirs.get("peak_rise_mb"),
            "worker_rss_mb": theirs.get("worker_rss_mb"),
            "same_worker": theirs.get("same_worker"),
        })
    worst: dict = {"cases": {}}
    for figure in ("in_process_ms", "in_process_peak_rise_mb", "served_ms",
                   "worker_peak_rise_mb", "worker_rss_mb"):
        known = [row for row in rows if row[figure] is not None]
        top = max(known, key=lambda row: row[figure], default=None)
        worst[figure] = top[figure] if top else None
        worst["cases"][figure] = top["case"] if top else None
    return {"limit_pixels": preprocessing.MAX_IMAGE_PIXELS, "max_request_bytes": MAX_MESSAGE_BYTES,
            "repeats": repeats, "cases": rows, "worst": worst}


def table(result: dict) -> str:
    """The per-case figures of ``measure`` as a Markdown table."""
    lines = ["| request | gRPC bytes | answer | in-process ms | in-process peak MiB | served ms "
             "| worker peak MiB |", "|---|---:|---|---:|---:|---:|---:|"]
    for case in result["cases"]:
        answer = case["served_answer"] or case["in_process_answer"]
        lines.append(
            f"| {case['description']} | {case['grpc_request_bytes']:,} | {answer} "
            f"| {case['in_process_ms']} | {case['in_process_peak_rise_mb']} | {case['served_ms']} "
            f"| {case['worker_peak_rise_mb']} |")
    return "\n".join(lines)
