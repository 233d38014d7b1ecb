"""Live drawing: every pen stroke goes to TorchServe as it is finished, and an answer comes back.

Over gRPC, ``LiveDrawing`` keeps one StreamPredictions2 call open to the stateful ``digitlive``
model (``live_handler``) and sends only the new stroke, a few hundred bytes; the server keeps
the canvas. Over REST, which keeps no state between requests, ``RestCanvas`` must send the whole
canvas again, as a PNG, after every stroke. ``measure_live_drawing`` draws the same digit both
ways and measures the bytes on the wire (with ``wire.WireCounter``) and the time per update.

A server for both: ``live_server_settings()`` (digitmodel and digitlive, side by side).
"""

from __future__ import annotations

import http.client
import io
import json
import os
import queue
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import grpc

from digitserve import archive, strokes
from digitserve.client import (
    DeadlineError,
    DigitClient,
    InvalidInputError,
    Prediction,
    ServingError,
)
from digitserve.config import (
    HOST,
    LIVE_ARCHIVE_NAME,
    LIVE_BATCH_SIZE,
    LIVE_MAX_BATCH_DELAY_MS,
    LIVE_MODEL_NAME,
    LIVE_SESSION_DEADLINE_S,
    MODEL_NAME,
    MODEL_STORE,
    RPC_DEADLINE_S,
)
from digitserve.grpc_stubs import inference_pb2
from digitserve.wire import WireCounter

#: The live model as ``ServerSettings.models`` lists it, beside ``ModelSpec()`` (digitmodel).
#: Its sequence batching settings live in the archive (``archive.live_model_config``).
LIVE_MODEL_MAR = f"{LIVE_ARCHIVE_NAME}.mar"

#: A 5 drawn in five strokes, as a hesitant hand would (fractions of the canvas, x right, y
#: down): the top bar, the down stroke, the two halves of the belly, the tail.
SCRIPTED_DIGIT = 5
SCRIPTED_STROKES: tuple[tuple[tuple[float, float], ...], ...] = (
    ((0.64, 0.22), (0.50, 0.22), (0.37, 0.23)),
    ((0.37, 0.23), (0.35, 0.36), (0.34, 0.49)),
    ((0.34, 0.49), (0.45, 0.44), (0.57, 0.46), (0.64, 0.56)),
    ((0.64, 0.56), (0.63, 0.68), (0.54, 0.77), (0.43, 0.79)),
    ((0.43, 0.79), (0.35, 0.77), (0.30, 0.72)),
)
#: How far apart a mouse's points are as it draws, in canvas pixels (one pointer event a frame).
POINT_SPACING_PX = 4.0


def mouse_points(polyline: Sequence[Sequence[float]], size: int = strokes.CANVAS_PIXELS,
                 spacing_px: float = POINT_SPACING_PX) -> list[list[int]]:
    """A stroke as a mouse reports it: the polyline (in fractions) every ``spacing_px`` pixels."""
    corners = [(x * size, y * size) for x, y in polyline]
    points = [corners[0]]
    for (x0, y0), (x1, y1) in zip(corners, corners[1:], strict=False):
        steps = max(1, round(((x1 - x0) ** 2 + (y1 - y0) ** 2) ** 0.5 / spacing_px))
        points += [(x0 + (x1 - x0) * i / steps, y0 + (y1 - y0) * i / steps)
                   for i in range(1, steps + 1)]
    return [[round(x), round(y)] for x, y in points]


def scripted_drawing() -> list[list[list[int]]]:
    """The strokes of ``SCRIPTED_STROKES`` in canvas pixels, as the pad would send them."""
    return [mouse_points(stroke) for stroke in SCRIPTED_STROKES]


def canvas_png(drawn: Sequence[Sequence[Sequence[float]]]) -> bytes:
    """The PNG of a canvas with these strokes (pixels): what a stateless API must be sent."""
    out = io.BytesIO()
    strokes.render(drawn).save(out, format="PNG")
    return out.getvalue()


@dataclass(frozen=True)
class LiveAnswer:
    """The answer to one stroke: the digit on the canvas so far."""

    prediction: Prediction
    strokes: int
    request_bytes: int
    seconds: float


class LiveDrawing:
    """One drawing over StreamPredictions2: ``send`` each stroke, get the digit so far.

    One call stays open for the whole drawing (``session_deadline_s``); every request carries the
    same ``sequence_id``, so TorchServe's sequence batching sends them, in order, to the worker
    that holds the canvas. Should the call end (a deadline, a dropped connection), the next
    ``send`` opens a new one with the same sequence id: the canvas belongs to the sequence, and
    drawing a stroke twice changes no pixel.

    Uses the client's public ``inference`` stub, ``metadata("inference")``, ``deadline_s`` (for
    each answer) and its ``_translate`` (to turn gRPC errors into the kit's ``ServingError``s).
    """

    def __init__(self, client: DigitClient, sequence_id: str | None = None,
                 model: str = LIVE_MODEL_NAME, version: str = "",
                 session_deadline_s: float = LIVE_SESSION_DEADLINE_S) -> None:
        self.client = client
        self.sequence_id = sequence_id or f"drawing-{uuid.uuid4().hex[:12]}"
        self.model, self.version = model, version
        self.session_deadline_s = session_deadline_s
        self.bytes_sent = 0
        self._requests: queue.Queue | None = None
        self._call = None
        self._clear_next = False
        self._lock = threading.Lock()

    # -- the drawing ---------------------------------------------------------------------------
    def send(self, points: Sequence[Sequence[float]] | bytes) -> LiveAnswer:
        """Send one finished stroke (canvas pixels, or already encoded); the answer for the
        canvas with it. An unreadable stroke raises ``InvalidInputError``; the call goes on."""
        stroke = points if isinstance(points, bytes) else strokes.encode(points)
        inputs = {"stroke": stroke}
        if self._clear_next:
            inputs["clear"] = b"1"
        answer = self._exchange(inputs)
        self._clear_next = False
        body = json.loads(answer.prediction)
        if "error" in body:
            raise InvalidInputError(body["error"], "OK")
        return LiveAnswer(Prediction.from_json(answer.prediction), body["strokes"],
                          answer.request_bytes, answer.seconds)

    def clear(self) -> None:
        """Start a new digit on the same sequence: the next stroke goes on an empty canvas."""
        self._clear_next = True

    def close(self, end: bool = True) -> None:
        """End the drawing: tell the handler to forget the canvas (``end``), close the call."""
        with self._lock:
            if self._call is None:
                return
        try:
            if end and not self._call.done():
                self._exchange({"end": b"1"})
        except ServingError:
            pass  # the call is gone already; the handler drops idle canvases by itself
        finally:
            with self._lock:
                if self._requests is not None:
                    self._requests.put(None)  # half-close: the server then ends the call
                call, self._call, self._requests = self._call, None, None
            if call is not None:
                try:
                    for _ in call:  # drain to the end of the call (nothing more is expected)
                        pass
                except grpc.RpcError:
                    pass  # ended by a deadline or a lost server: nothing is left to close

    def __enter__(self) -> LiveDrawing:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.close()
        except (ServingError, grpc.RpcError):
            pass

    # -- plumbing ------------------------------------------------------------------------------
    @dataclass(frozen=True)
    class _Reply:
        prediction: bytes
        request_bytes: int
        seconds: float

    def _open(self) -> None:
        self._requests = queue.Queue()
        self._call = self.client.inference.StreamPredictions2(
            iter(self._requests.get, None), timeout=self.session_deadline_s,
            metadata=self.client.metadata("inference"),
        )

    def _exchange(self, inputs: dict[str, bytes], retry: bool = True) -> LiveDrawing._Reply:
        request = inference_pb2.PredictionsRequest(
            model_name=self.model, model_version=self.version, sequence_id=self.sequence_id,
            input=inputs,
        )
        with self._lock:
            if self._call is None or self._call.done():
                self._open()
            call, requests = self._call, self._requests
        timed_out = threading.Event()

        def expire() -> None:
            timed_out.set()
            call.cancel()

        timer = threading.Timer(self.client.deadline_s, expire)
        started = time.perf_counter()
        requests.put(request)
        timer.start()
        try:
            reply = next(call)
        except StopIteration:
            raise ServingError("StreamPredictions2 ended before answering the stroke") from None
        except grpc.RpcError as err:
            if timed_out.is_set():
                raise DeadlineError(f"no answer to the stroke within {self.client.deadline_s} s "
                                    "from TorchServe") from None
            if retry and err.code() in (grpc.StatusCode.DEADLINE_EXCEEDED,
                                        grpc.StatusCode.UNAVAILABLE):
                return self._exchange(inputs, retry=False)  # a new call, the same sequence
            raise self.client._translate(err, self.model, self.version) from None
        finally:
            timer.cancel()
        seconds = time.perf_counter() - started
        self.bytes_sent += request.ByteSize()
        if reply.HasField("status") and reply.status.code != 0:
            code = next((c.name for c in grpc.StatusCode if c.value[0] == reply.status.code),
                        str(reply.status.code))
            raise ServingError(f"StreamPredictions2: {code}: {reply.status.message}", code)
        return self._Reply(reply.prediction, request.ByteSize(), seconds)


class RestCanvas:
    """TorchServe's REST inference API on one keep-alive connection: a whole PNG per update."""

    def __init__(self, port: int, authorization: str, model: str = MODEL_NAME,
                 host: str = HOST, timeout_s: float = RPC_DEADLINE_S) -> None:
        self.connection = http.client.HTTPConnection(host, port, timeout=timeout_s)
        self.path = f"/predictions/{model}"
        self.headers = {"Authorization": authorization,
                        "Content-Type": "application/octet-stream"}

    def predict(self, png: bytes) -> tuple[Prediction, float]:
        """POST the image; its answer and the seconds from sending to the whole answer."""
        started = time.perf_counter()
        self.connection.request("POST", self.path, body=png, headers=self.headers)
        response = self.connection.getresponse()
        body = response.read()
        seconds = time.perf_counter() - started
        if response.status != 200:
            raise ServingError(f"REST {response.status}: {body[:300].decode(errors='replace')}")
        return Prediction.from_json(body), seconds

    def close(self) -> None:
        self.connection.close()


# -- a server for both, and the measurement ---------------------------------------------------
def live_server_settings(**overrides):
    """ServerSettings serving digitmodel and the live model side by side (built when missing)."""
    from digitserve.server import ModelSpec, ServerSettings

    settings = ServerSettings(**overrides)
    archive.require_live(Path(settings.model_store) / f"{archive.ARCHIVE_NAME}.mar",
                         settings.model_store)
    live = ModelSpec(name=LIVE_MODEL_NAME, mar=LIVE_MODEL_MAR, batch_size=LIVE_BATCH_SIZE,
                     max_batch_delay_ms=LIVE_MAX_BATCH_DELAY_MS)
    return replace(settings, models=(ModelSpec(), live))


@dataclass
class StrokeRecord:
    """One stroke of a measured drawing: what each API sent and answered."""

    points: int
    grpc: Prediction
    rest: Prediction
    grpc_message_bytes: int
    png_bytes: int
    grpc_wire: tuple[int, int] = (0, 0)  # bytes (sent, received) on the wire for this update
    rest_wire: tuple[int, int] = (0, 0)


@dataclass
class LiveDrawingRun:
    """A measured drawing: per stroke, wire totals (connection set-up included), times."""

    strokes: list[StrokeRecord]
    bytes_grpc: int
    bytes_rest: int
    connections: dict[str, int]
    ms_grpc: list[float] = field(default_factory=list)
    ms_rest: list[float] = field(default_factory=list)
    load_average: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def summary(self) -> dict:
        """The figures ``measure_live_drawing`` returns (see there)."""
        return {
            "strokes": len(self.strokes),
            "answers": [{"stroke": i, "digit": s.grpc.digit,
                         "probability": s.grpc.probability,
                         "same_as_rest": s.grpc.digit == s.rest.digit and max(
                             abs(p - q) for p, q in zip(s.grpc.probabilities,
                                                        s.rest.probabilities, strict=True)
                         ) < 1e-5}
                        for i, s in enumerate(self.strokes, start=1)],
            "bytes_grpc": self.bytes_grpc,
            "bytes_rest": self.bytes_rest,
            "ms_per_update_grpc": round(statistics.median(self.ms_grpc), 3),
            "ms_per_update_rest": round(statistics.median(self.ms_rest), 3),
        }


def run_live_drawing(run_dir: Path, drawing: Sequence[Sequence[Sequence[float]]] | None = None,
                     rounds: int = 5) -> LiveDrawingRun:
    """Draw ``drawing`` (default ``scripted_drawing()``) against the server of ``run_dir``.

    First once through two ``WireCounter`` proxies, gRPC and REST, each on a new connection,
    to count every byte of the conversation (connection set-up included); then ``rounds`` times
    directly, alternating which API goes first, for the time from sending an update to its
    answer (the client's own PNG or stroke encoding excluded, warm connections).
    """
    from digitserve.server import read_state

    drawing = [list(map(list, stroke)) for stroke in (drawing or scripted_drawing())]
    pngs = [canvas_png(drawing[:n]) for n in range(1, len(drawing) + 1)]
    state = read_state(run_dir)
    if state is None:
        raise ServingError(f"no TorchServe was started from {run_dir}: start one with "
                           "ServerSettings from live.live_server_settings().")
    ports, key_file = state["ports"], Path(state["key_file"])
    management = f"{HOST}:{ports['grpc_management']}"
    # One sequence id for every drawing, each started with a clear: a drawer who clears and
    # draws again. (A new sequence per drawing would wait for the frontend's polling thread
    # that the last one holds until it has been idle LIVE_SEQUENCE_MAX_IDLE_MS.)
    sequence_id = f"measure-{uuid.uuid4().hex[:12]}"
    records: list[StrokeRecord] = []
    with WireCounter(ports["grpc_inference"]) as grpc_wire, \
            WireCounter(ports["http_inference"]) as rest_wire, \
            DigitClient(grpc_wire.address, management, key_file=key_file) as client:
        rest = RestCanvas(rest_wire.port, dict(client.metadata("inference"))["authorization"])
        session = LiveDrawing(client, sequence_id)
        session.clear()
        try:
            for points, png in zip(drawing, pngs, strict=True):
                before_g, before_r = grpc_wire.wait_quiet(0.02), rest_wire.wait_quiet(0.02)
                answer = session.send(points)
                after_g = grpc_wire.wait_quiet(0.02)
                rest_answer, _ = rest.predict(png)
                after_r = rest_wire.wait_quiet(0.02)
                records.append(StrokeRecord(
                    len(points), answer.prediction, rest_answer, answer.request_bytes,
                    len(png), ((after_g - before_g).sent, (after_g - before_g).received),
                    ((after_r - before_r).sent, (after_r - before_r).received)))
            session.close(end=False)
        finally:
            rest.close()
        grpc_total, rest_total = grpc_wire.wait_quiet(), rest_wire.wait_quiet()
    run = LiveDrawingRun(records, grpc_total.total, rest_total.total,
                         {"grpc": grpc_total.connections, "rest": rest_total.connections})
    with DigitClient.for_run_dir(run_dir) as client, LiveDrawing(client, sequence_id) as session:
        rest = RestCanvas(ports["http_inference"],
                          dict(client.metadata("inference"))["authorization"])
        try:
            for round_index in range(rounds + 1):  # round 0 warms both paths up
                ms_grpc, ms_rest = [], []
                order = ("grpc", "rest") if round_index % 2 else ("rest", "grpc")
                for api in order:
                    if api == "grpc":
                        session.clear()
                        ms_grpc = [1000 * session.send(p).seconds for p in drawing]
                    else:
                        ms_rest = [1000 * rest.predict(png)[1] for png in pngs]
                if round_index:
                    run.ms_grpc += ms_grpc
                    run.ms_rest += ms_rest
        finally:
            rest.close()
    run.load_average = os.getloadavg()
    return run


def measure_live_drawing(run_dir: Path | None = None,
                         drawing: Sequence[Sequence[Sequence[float]]] | None = None,
                         rounds: int = 5) -> dict:
    """The live drawing, gRPC (StreamPredictions2, only the new stroke) against REST (the whole
    canvas as a PNG after every stroke).

    ``run_dir``: a running TorchServe serving digitmodel and digitlive
    (``live_server_settings``); None starts one on free ports from the kit's model store
    (``digit-model.mar`` must exist; the live archive is built from it) and stops it after.

    Returns ``{"strokes": n, "answers": [{"stroke", "digit", "probability", "same_as_rest"}]
    (one per stroke), "bytes_grpc", "bytes_rest" (every byte on the wire both ways for the whole
    drawing, connection set-up included), "ms_per_update_grpc", "ms_per_update_rest"`` (median
    time from sending an update to its answer over ``rounds`` drawings).
    """
    if run_dir is not None:
        return run_live_drawing(Path(run_dir), drawing, rounds).summary()
    from digitserve.server import TorchServe, free_ports

    with tempfile.TemporaryDirectory(prefix="digitserve-live-") as tmp:
        settings = live_server_settings(ports=free_ports(), run_dir=Path(tmp) / "run",
                                        model_store=MODEL_STORE)
        with TorchServe(settings):
            return run_live_drawing(settings.run_dir, drawing, rounds).summary()
