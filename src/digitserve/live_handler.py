"""The handler of the live-drawing model: a canvas per sequence, an answer after every stroke.

Archived (``archive.build_live_archive``) with TorchServe's *sequence batching* on, and served
beside digitmodel under the name ``digitlive``. A client opens StreamPredictions2, gives every
request the same ``sequence_id`` and sends each pen stroke as it is finished; TorchServe routes
a sequence's requests in order, and this handler keeps the canvas of each sequence id, draws the
new stroke on it and answers with the same preprocessing and the same JSON as digitmodel
(``digit``, ``probability``, ``probabilities``, ``model_version``), plus ``strokes``: how many
the canvas holds.

A request's input map:

- ``stroke``: the new stroke, binary (x, y little-endian uint16 pixels) or JSON ``[[x, y], ...]``
  (see ``strokes``), on a ``strokes.CANVAS_PIXELS``-pixel square canvas;
- ``clear`` (any value): empty the canvas first (a new digit on the same sequence);
- ``end`` (any value): forget the canvas after answering (the drawing is done); alone, it
  gets ``{"ended": true}`` (false when there was no canvas to forget).

Every answer, errors included, is a 200 with a JSON body: an unreadable stroke or an empty
canvas gets ``{"error": message, "code": 400}``. TorchServe 0.12.0 cannot send a failed
StreamPredictions2 request's status (its frontend throws building the error message), so a
handler of a sequence model must never raise for a request.

The canvas belongs to the sequence id, not to the call: a new StreamPredictions2 call (after a
deadline, a dropped connection) with the same ``sequence_id`` continues the same drawing, until
the canvas sits unused for ``canvas_idle_s`` or ``max_canvases`` newer ones push it out (both
from the ``handler`` section of the archive's model-config.yaml).
"""

from __future__ import annotations

import json
import logging

import numpy as np
import torch

if __package__:  # imported from the installed package (tests, notebooks)
    from . import preprocessing, strokes
    from .handler import DigitHandler
else:  # inside the .mar, TorchServe puts the archived files beside the handler
    import preprocessing
    import strokes
    from handler import DigitHandler

logger = logging.getLogger(__name__)


class LiveDrawingHandler(DigitHandler):
    """Strokes in, the digit on the canvas so far out; one canvas per sequence id."""

    def initialize(self, context) -> None:
        super().initialize(context)
        settings = (getattr(context, "model_yaml_config", None) or {}).get("handler") or {}
        self.canvases = strokes.CanvasStore(
            max_canvases=int(settings.get("max_canvases", 64)),
            idle_s=float(settings.get("canvas_idle_s", 1800)),
        )

    def handle(self, data: list[dict], context) -> list[str]:
        """Draw each request's stroke on its sequence's canvas and answer for every one."""
        if context.get_request_header(0, "describe") == "True":
            return [json.dumps(self.describe_handle())]
        answers: dict[int, dict] = {}
        digits: dict[int, np.ndarray] = {}
        counts: dict[int, int] = {}
        for index, request in enumerate(data):
            if set(request) & {"end", "stroke", "clear"} == {"end"}:
                ended = self.canvases.forget(context.get_sequence_id(index) or "")
                answers[index] = {"ended": ended}
                continue
            try:
                digits[index], counts[index] = self.read(request, context.get_sequence_id(index))
            except (strokes.StrokeError, preprocessing.InvalidInput) as err:
                answers[index] = {"error": str(err), "code": 400}
            except Exception as err:  # noqa: BLE001 - never raise: see the module's docstring
                logger.exception("could not read a stroke")
                answers[index] = {"error": f"the handler could not read this stroke "
                                           f"({type(err).__name__}: {err})", "code": 400}
        if digits:
            indices = sorted(digits)
            batch = torch.from_numpy(np.stack([digits[i] for i in indices]))
            for index, row in zip(indices, self.predict_probabilities(batch).tolist(),
                                  strict=True):
                answers[index] = {**self.answer(row), "strokes": counts[index]}
        for index, request in enumerate(data):
            if "end" in request:
                self.canvases.forget(context.get_sequence_id(index))
        return [json.dumps(answers[i]) for i in range(len(data))]

    def read(self, request: dict, sequence_id: str | None) -> tuple[np.ndarray, int]:
        """Apply one request to its canvas; the 28×28 digit on it and its number of strokes."""
        if not sequence_id:
            raise strokes.StrokeError(
                "no sequence id: send strokes over StreamPredictions2 with a sequence_id (the "
                "same for every stroke of a drawing)"
            )
        stroke = request.get("stroke")
        if stroke is None and "clear" not in request and "end" not in request:
            came = ", ".join(sorted(map(str, request))) or "none"
            raise strokes.StrokeError(
                f"no stroke in the request: expected the key 'stroke' (or 'clear', 'end'); keys "
                f"received: {came}"
            )
        points = None if stroke is None else strokes.decode(stroke)
        canvas, count = self.canvases.apply(sequence_id, points, clear="clear" in request)
        pixels = np.asarray(canvas, dtype=np.float32)
        return preprocessing.normalize_digit(pixels), count

    def describe_handle(self) -> dict:
        return {
            "model_version": self.version,
            "input": "StreamPredictions2 with a sequence_id; per request 'stroke' (binary "
                     "little-endian uint16 x, y pixels, or JSON [[x, y], ...]), optional "
                     "'clear' and 'end'",
            "canvas": {"pixels": strokes.CANVAS_PIXELS, "pen": strokes.PEN_PIXELS},
            "output": "digitmodel's answer for the canvas so far, plus 'strokes'",
        }
