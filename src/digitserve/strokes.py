"""Pen strokes: how a drawn stroke travels, and how strokes become the pixels of a canvas.

One definition for the drawing pad, the scripted drawings and the live-drawing handler, so a
canvas drawn from strokes on the server holds the same pixels as the PNG a client renders from
the same strokes. A stroke is a list of (x, y) points in canvas pixels, (0, 0) top left.

On the wire a stroke is either compact binary, 4 bytes a point (x and y as little-endian
unsigned 16-bit integers: ``encode``), or JSON text ``[[x, y], ...]`` for people typing it.

This file is archived into the live-drawing .mar beside the handler, so it imports nothing
from the package.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw

#: The canvas's side in pixels and the pen's width: about MNIST's proportions (a 20-pixel digit
#: drawn with a 2–3-pixel pen in a 28-pixel square), ten times larger.
CANVAS_PIXELS = 280
PEN_PIXELS = 22
#: The most points one stroke may hold (a slow, long stroke has a few hundred): it bounds the
#: work one message can ask of the handler.
MAX_POINTS = 4096
#: The most strokes one canvas may gather before it must be cleared.
MAX_STROKES = 256


class StrokeError(ValueError):
    """A stroke message cannot be read; the message says why and what is expected."""


def encode(points: Iterable[Sequence[float]]) -> bytes:
    """A stroke as compact binary: x, y as little-endian uint16 pixels, 4 bytes a point."""
    array = np.asarray(list(points), dtype=np.float64).reshape(-1, 2)
    return np.clip(np.rint(array), 0, 65535).astype("<u2").tobytes()


def decode(payload: bytes | bytearray | str | list) -> np.ndarray:
    """The points of one stroke message (binary or JSON), shape (N, 2), or ``StrokeError``."""
    if isinstance(payload, (bytes, bytearray)):
        data = bytes(payload)
        if data[:1] == b"[":
            payload = data.decode("utf-8", errors="replace")
        else:
            if not data or len(data) % 4:
                raise StrokeError(
                    f"a binary stroke is 4 bytes a point (x, y as little-endian uint16); "
                    f"got {len(data)} bytes"
                )
            points = np.frombuffer(data, dtype="<u2").reshape(-1, 2).astype(np.float64)
            return _checked(points)
    if isinstance(payload, str):
        try:
            payload = json.loads(payload)
        except json.JSONDecodeError as err:
            raise StrokeError(f"the stroke is neither binary nor JSON: {err}") from None
    try:
        points = np.asarray(payload, dtype=np.float64)
    except (TypeError, ValueError):
        raise StrokeError("a JSON stroke is a list of [x, y] pairs of numbers") from None
    if points.ndim != 2 or points.shape[1:] != (2,):
        raise StrokeError(f"a JSON stroke is a list of [x, y] pairs; got shape {points.shape}")
    return _checked(points)


def _checked(points: np.ndarray) -> np.ndarray:
    if len(points) == 0:
        raise StrokeError("the stroke holds no point")
    if len(points) > MAX_POINTS:
        raise StrokeError(f"the stroke holds {len(points):,} points, over the limit of "
                          f"{MAX_POINTS:,}: send it in several strokes")
    if not np.isfinite(points).all():
        raise StrokeError("stroke coordinates must be finite numbers")
    return points


def blank_canvas(size: int = CANVAS_PIXELS) -> Image.Image:
    """A white canvas, grayscale, as the pad starts."""
    return Image.new("L", (size, size), 255)


def draw(canvas: Image.Image, points: Sequence[Sequence[float]], pen: int = PEN_PIXELS) -> None:
    """Draw one stroke in black with a round pen, as the browser's canvas does."""
    pen_draw = ImageDraw.Draw(canvas)
    xy = [(float(x), float(y)) for x, y in points]
    if len(xy) > 1:
        pen_draw.line(xy, fill=0, width=pen, joint="curve")
    for x, y in xy[:1] + xy[-1:]:  # round pen ends
        pen_draw.ellipse((x - pen / 2, y - pen / 2, x + pen / 2, y + pen / 2), fill=0)


def render(strokes: Iterable[Sequence[Sequence[float]]], size: int = CANVAS_PIXELS,
           pen: int = PEN_PIXELS) -> Image.Image:
    """A canvas with these strokes drawn on it, in order."""
    canvas = blank_canvas(size)
    for points in strokes:
        draw(canvas, points, pen)
    return canvas


def to_pixels(stroke: Sequence[Sequence[float]], size: int = CANVAS_PIXELS) -> list[list[int]]:
    """A stroke given in fractions of the canvas (0–1) as whole pixels."""
    return [[round(x * size), round(y * size)] for x, y in stroke]


class CanvasStore:
    """One canvas per sequence id, the least recently used dropped first, idle ones expired."""

    def __init__(self, max_canvases: int = 64, idle_s: float = 1800.0,
                 size: int = CANVAS_PIXELS, pen: int = PEN_PIXELS) -> None:
        self.max_canvases, self.idle_s, self.size, self.pen = max_canvases, idle_s, size, pen
        self._canvases: OrderedDict[str, tuple[Image.Image, int, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._canvases)

    def apply(self, sequence_id: str, stroke: np.ndarray | None, clear: bool = False
              ) -> tuple[Image.Image, int]:
        """Clear the sequence's canvas if asked, draw the stroke; return the canvas and its
        number of strokes."""
        now = time.monotonic()
        self._expire(now)
        canvas, count, _ = self._canvases.pop(sequence_id, (None, 0, now))
        if canvas is None or clear:
            canvas, count = blank_canvas(self.size), 0
        if stroke is not None:
            if count >= MAX_STROKES:
                self._canvases[sequence_id] = (canvas, count, now)
                raise StrokeError(f"the canvas already holds {MAX_STROKES} strokes: clear it")
            draw(canvas, stroke, self.pen)
            count += 1
        self._canvases[sequence_id] = (canvas, count, now)
        while len(self._canvases) > self.max_canvases:
            self._canvases.popitem(last=False)
        return canvas, count

    def forget(self, sequence_id: str) -> bool:
        """Drop a sequence's canvas; True if there was one."""
        return self._canvases.pop(sequence_id, None) is not None

    def _expire(self, now: float) -> None:
        for sequence_id in [s for s, (_, _, used) in self._canvases.items()
                            if now - used > self.idle_s]:
            del self._canvases[sequence_id]
