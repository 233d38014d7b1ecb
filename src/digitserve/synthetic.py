"""Images a person might really send, made from MNIST test digits, and a catalogue of bad input.

They let the lessons and the tests check the serving path on inputs that are not MNIST-shaped
(a phone photo of ink on paper, a drawing on a transparent canvas) and on inputs that must fail.
"""

from __future__ import annotations

import io
import json
import zlib

import numpy as np
from PIL import Image, ImageFilter


def photo_like(digit: np.ndarray, seed: int = 0) -> bytes:
    """A JPEG of dark ink on cream paper, off-centre, under uneven light, with noise and blur."""
    rng = np.random.default_rng(seed)
    height, width = 260, 320
    stroke = np.asarray(Image.fromarray(digit).resize((140, 140), Image.BICUBIC)) / 255.0
    ink = np.zeros((height, width))
    ink[40:180, 150:290] = stroke
    rows, cols = np.mgrid[0:height, 0:width]
    light = 215 - 45 * cols / width - 15 * rows / height
    paper = np.stack([light, light * 0.97, light * 0.9], axis=-1)
    pixels = paper * (1 - ink[..., None]) + np.array([30, 30, 60]) * ink[..., None]
    pixels += rng.normal(0, 6, pixels.shape)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    return _encode(image.filter(ImageFilter.GaussianBlur(1.2)), "JPEG", quality=75)


def canvas_like(digit: np.ndarray) -> bytes:
    """A PNG of black strokes on a transparent 280×280 canvas, as a drawing widget exports."""
    stroke = np.asarray(Image.fromarray(digit).resize((200, 200), Image.BILINEAR))
    rgba = np.zeros((280, 280, 4), dtype=np.uint8)
    rgba[20:220, 60:260, 3] = stroke
    return _encode(Image.fromarray(rgba, "RGBA"), "PNG")


def png(digit: np.ndarray) -> bytes:
    """The PNG bytes of a uint8 grayscale image."""
    return _encode(Image.fromarray(digit, "L"), "PNG")


def decompression_bomb(width: int = 20_000, height: int = 20_000) -> bytes:
    """A tiny, valid PNG whose header claims width×height pixels."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body).to_bytes(4, "big")
        return len(body).to_bytes(4, "big") + kind + body + crc

    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\0" * 1024)) + chunk(b"IEND", b""))


#: A small, valid Encapsulated PostScript file: a format the kit does not read (Pillow would run
#: Ghostscript to decode it, where installed).
EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 28 28\n"
       b"4 4 moveto 24 24 lineto stroke\nshowpage\n%%EOF\n")


def bad_inputs(good_png: bytes) -> dict[str, tuple[dict[str, bytes], str]]:
    """Bad requests (gRPC input maps) with a phrase each one's error message must contain."""
    return {
        "empty payload": ({"data": b""}, "empty"),
        "bytes that are no image": ({"data": b"\x00\x01 not an image \xff" * 4}, "not an image"),
        "truncated PNG": ({"data": good_png[: len(good_png) // 2]}, "truncated"),
        "decompression bomb": ({"data": decompression_bomb()}, "decompression bomb"),
        "image one column over the pixel limit": (
            {"data": decompression_bomb(2049, 2048)}, "over the kit's limit"),
        "a format the kit does not read (EPS)": ({"data": EPS}, "not an image the kit reads"),
        "pixel list of the wrong shape": ({"data": json.dumps([1, 2, 3]).encode()}, "shape"),
        "ragged pixel list": ({"data": json.dumps([[1, 2], [3]]).encode()}, "ragged"),
        "JSON nested 100,000 deep": (
            {"data": b"[" * 100_000 + b"]" * 100_000}, "nested too deeply"),
        "blank image": ({"data": png(np.zeros((28, 28), np.uint8))}, "no digit"),
        "missing key": ({"image": good_png}, "keys received: image"),
        "a key with line breaks": ({"a\r\nb": good_png}, "keys received: a??b"),
        "a key of 1,000 characters": ({"k" * 1000: good_png}, "characters long"),
        "nine input keys": (
            {"data": good_png, **{f"extra{i}": b"1" for i in range(8)}}, "9 input keys"),
    }


def _encode(image: Image.Image, image_format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **options)
    return buffer.getvalue()
