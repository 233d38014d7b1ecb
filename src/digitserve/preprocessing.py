"""The one preprocessing definition: training, evaluation and the TorchServe handler all call it.

Two stages:

1. ``digit_from_payload`` / ``normalize_digit`` turn whatever a person sends (PNG, JPEG, a photo of
   dark ink on paper, a transparent canvas, base64 text, a list of pixels) into a 28×28 uint8
   digit made the way MNIST was made: light digit on dark ground, its box scaled into 20×20 and
   centred by centre of mass. MNIST digits pass through almost unchanged, and training applies it
   too, so the model sees at training time exactly what it sees when served.
2. ``to_model_input`` turns 28×28 digits into the normalised 3×96×96 tensors DigitCNN expects.

And its two ends on the wire, which every server of the kit shares (TorchServe's handler, KServe,
Ray Serve): ``payload_from_tensor`` reads one Open Inference Protocol input tensor, ``answer``
makes the JSON answer from the model's probabilities.

This file is archived into the .mar beside the handler, so it imports nothing from the package.
"""

from __future__ import annotations

import base64
import binascii
import io
import json

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

IMAGE_SIZE = 96
MNIST_SIZE = 28
MNIST_BOX = 20
#: Mean and standard deviation of MNIST training pixels scaled to [0, 1].
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081
#: The largest image, in pixels, the kit decodes: beyond it a few KB can expand to gigabytes.
MAX_IMAGE_PIXELS = 16_000_000
#: A pixel counts as ink when it is this much brighter than the background (0–255 scale).
INK_THRESHOLD = 32


_too_many_pixels = (
    f"over the limit of {MAX_IMAGE_PIXELS:,} pixels (a decompression bomb guard): "
    "scale it down before sending"
)


class InvalidInput(ValueError):
    """The payload cannot be read as a digit; the message says why and what is expected."""


def to_model_input(digits: torch.Tensor) -> torch.Tensor:
    """Turn uint8 digits of shape (N, 28, 28) or (N, 1, 28, 28) into float (N, 3, 96, 96)."""
    if digits.ndim == 3:
        digits = digits.unsqueeze(1)
    return _MODEL_TRANSFORM(digits).expand(-1, 3, -1, -1)


_MODEL_TRANSFORM = v2.Compose(
    [
        v2.ToDtype(torch.float32, scale=True),
        v2.Resize((IMAGE_SIZE, IMAGE_SIZE), antialias=True),
        v2.Normalize([MNIST_MEAN], [MNIST_STD]),
    ]
)


def normalize_digit(gray: np.ndarray) -> np.ndarray:
    """Make a grayscale image of any size into an MNIST-style 28×28 uint8 digit.

    The ground is read from the border: a light border means dark ink, which is inverted.
    Ink is told from ground by Otsu's threshold; the brightest ground seen on the border (paper
    texture, uneven light, JPEG noise) becomes 0 and typical ink 255. The ink's bounding box is
    then scaled so its longer side is 20 pixels and placed in 28×28 with its centre of mass in
    the middle, as in the original MNIST. Clean MNIST digits come back almost unchanged.
    """
    gray = gray.astype(np.float32)
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    if np.median(border) > 127:
        gray, border = 255.0 - gray, 255.0 - border
    if gray.max() - np.median(border) < INK_THRESHOLD:
        raise InvalidInput(
            "the image holds no digit: every pixel is within "
            f"{INK_THRESHOLD}/255 of the background"
        )
    threshold = otsu_threshold(gray)
    ground = min(float(np.percentile(border, 99)), threshold)
    ink_level = float(np.percentile(gray[gray >= threshold], 90))
    ink = np.clip((gray - ground) / max(ink_level - ground, 1.0), 0.0, 1.0) * 255.0
    rows = np.flatnonzero((ink >= INK_THRESHOLD).any(axis=1))
    cols = np.flatnonzero((ink >= INK_THRESHOLD).any(axis=0))
    box = torch.from_numpy(ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].copy())
    height, width = box.shape
    scale = MNIST_BOX / max(height, width)
    size = [max(1, round(height * scale)), max(1, round(width * scale))]
    if size != [height, width]:
        box = F.resize(box[None], size, antialias=True)[0]
    box = box.clamp(0, 255).numpy()
    total = box.sum()
    ys, xs = np.indices(box.shape)
    top = int(round(MNIST_SIZE / 2 - (ys * box).sum() / total))
    left = int(round(MNIST_SIZE / 2 - (xs * box).sum() / total))
    top = min(max(top, 0), MNIST_SIZE - box.shape[0])
    left = min(max(left, 0), MNIST_SIZE - box.shape[1])
    digit = np.zeros((MNIST_SIZE, MNIST_SIZE), dtype=np.float32)
    digit[top : top + box.shape[0], left : left + box.shape[1]] = box
    return np.round(digit).astype(np.uint8)


def otsu_threshold(gray: np.ndarray) -> float:
    """The grey level that best splits the pixels into two classes (Otsu, 1979)."""
    counts, edges = np.histogram(gray, bins=256, range=(0.0, 256.0))
    levels = (edges[:-1] + edges[1:]) / 2
    weight_low = np.cumsum(counts)
    weight_high = weight_low[-1] - weight_low
    sum_low = np.cumsum(counts * levels)
    mean_low = sum_low / np.maximum(weight_low, 1)
    mean_high = (sum_low[-1] - sum_low) / np.maximum(weight_high, 1)
    between = weight_low * weight_high * (mean_low - mean_high) ** 2
    return float(edges[int(np.argmax(between)) + 1])


def normalize_digits(digits: torch.Tensor) -> torch.Tensor:
    """Apply ``normalize_digit`` to a uint8 batch (N, 28, 28), as training does to MNIST."""
    return torch.from_numpy(np.stack([normalize_digit(d) for d in digits.numpy()]))


def digit_from_payload(payload: object) -> np.ndarray:
    """Read one request payload into a 28×28 uint8 digit, or raise ``InvalidInput``.

    Accepted: image bytes (PNG, JPEG, BMP, GIF, WebP, TIFF), the same as base64 text,
    or JSON text / a list of pixel rows (H×W, values 0–255 or 0–1).
    """
    if isinstance(payload, (bytes, bytearray)):
        data = bytes(payload)
        if not data:
            raise InvalidInput("the payload is empty: send the bytes of an image")
        if _looks_like_text(data):
            return digit_from_payload(data.decode("utf-8"))
        return normalize_digit(_gray_pixels(_open_image(data)))
    if isinstance(payload, str):
        text = payload.strip()
        if not text:
            raise InvalidInput("the payload is empty: send the bytes of an image")
        if text[0] in "[{":
            try:
                return digit_from_payload(json.loads(text))
            except json.JSONDecodeError as err:
                raise InvalidInput(f"the payload looks like JSON but is not: {err}") from None
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidInput(
                "the payload is text but neither a JSON pixel list nor base64 image data"
            ) from None
        return normalize_digit(_gray_pixels(_open_image(data)))
    if isinstance(payload, dict) and "data" in payload:
        return digit_from_payload(payload["data"])
    if isinstance(payload, list):
        return normalize_digit(_pixels_from_list(payload))
    raise InvalidInput(f"cannot read a digit from a payload of type {type(payload).__name__}")


def _looks_like_text(data: bytes) -> bool:
    """True for JSON or base64 text; image formats all start with a binary signature."""
    head = data[:64].lstrip()
    return (bool(head) and head[:1] in b"[{") or _is_base64_head(head)


def _is_base64_head(head: bytes) -> bool:
    alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=\r\n"
    return len(head) >= 8 and all(byte in alphabet for byte in head)


def _open_image(data: bytes) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise InvalidInput(
            f"the {len(data)} bytes sent are not an image PIL can read "
            "(PNG, JPEG, BMP, GIF, WebP, TIFF)"
        ) from None
    except Image.DecompressionBombError:
        raise InvalidInput(f"the image claims over {2 * Image.MAX_IMAGE_PIXELS:,} pixels, "
                           f"{_too_many_pixels}") from None
    pixels = image.width * image.height
    if pixels > MAX_IMAGE_PIXELS:
        raise InvalidInput(
            f"the image is {image.width}×{image.height} = {pixels:,} pixels, "
            f"{_too_many_pixels}"
        )
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as err:
        raise InvalidInput(f"the {image.format} image is truncated or corrupt: {err}") from None
    return image


def _gray_pixels(image: Image.Image) -> np.ndarray:
    """Grayscale pixels 0–255 of any mode; transparency is laid over a ground that shows the ink."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        pixels = np.asarray(image, dtype=np.float32)
        top = 65535.0 if image.mode.startswith("I;16") else max(float(pixels.max()), 1.0)
        return np.clip(pixels * (255.0 / top), 0, 255)
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float32)
        alpha = rgba[..., 3:] / 255.0
        luminance = np.asarray(image.convert("RGBA").convert("L"), dtype=np.float32)
        ink = luminance[alpha[..., 0] > 0.5]
        ground = 255.0 if ink.size and ink.mean() < 128 else 0.0
        return luminance * alpha[..., 0] + ground * (1.0 - alpha[..., 0])
    return np.asarray(image.convert("L"), dtype=np.float32)


def _pixels_from_list(rows: list) -> np.ndarray:
    try:
        pixels = np.asarray(rows, dtype=np.float32)
    except (TypeError, ValueError):
        raise InvalidInput(
            "the pixel list is ragged or holds non-numbers: send rows of equal length"
        ) from None
    if pixels.ndim != 2 or min(pixels.shape) < 1:
        raise InvalidInput(
            f"the pixel list has shape {pixels.shape}: expected a 2-D list of rows, e.g. 28×28"
        )
    if pixels.size > MAX_IMAGE_PIXELS:
        raise InvalidInput(f"the pixel list has {pixels.size:,} pixels, over {MAX_IMAGE_PIXELS:,}")
    if not np.isfinite(pixels).all() or pixels.min() < 0 or pixels.max() > 255:
        raise InvalidInput("pixel values must be finite numbers from 0 to 255 (or 0 to 1)")
    if pixels.max() <= 1.0:
        pixels = pixels * 255.0
    return pixels


#: Open Inference Protocol datatypes a pixel tensor may have (BYTES carries an encoded image).
OIP_PIXEL_TYPES = ("UINT8", "UINT16", "UINT32", "INT8", "INT16", "INT32", "INT64", "FP32", "FP64")


def payload_from_tensor(datatype: str, shape: list[int], data: list) -> bytes | list:
    """The image of one Open Inference Protocol input tensor, for ``digit_from_payload``.

    BYTES: exactly one element, the image bytes (decoded from base64 by the caller where the
    server sends them so). A pixel tensor: shape (28, 28) or (1, 28, 28) (any H×W), flat values.
    """
    if datatype == "BYTES":
        if len(data) != 1:
            raise InvalidInput(
                f"the BYTES input holds {len(data)} elements: send one image per request"
            )
        element = data[0]
        return element.encode("utf-8") if isinstance(element, str) else bytes(element)
    if datatype not in OIP_PIXEL_TYPES:
        raise InvalidInput(
            f"input datatype {datatype!r} is not supported: send BYTES (an image) or a pixel "
            f"tensor of one of {', '.join(OIP_PIXEL_TYPES)}"
        )
    shape = [int(size) for size in shape or []]
    rows = [size for size in shape if size != 1] if len(shape) > 2 else shape
    if len(rows) != 2 or rows[0] * rows[1] != len(data):
        raise InvalidInput(
            f"the pixel tensor has shape {shape} and {len(data)} values: expected one image, "
            "shape [28, 28] or [1, 28, 28], with as many values as the shape says"
        )
    return np.asarray(data).reshape(rows).tolist()


def answer(probabilities: list[float], version: str = "") -> dict:
    """The JSON answer for one image: the digit is the argmax, 0–9 (every server sends this)."""
    digit = max(range(10), key=probabilities.__getitem__)
    return {
        "digit": digit,
        "probability": round(probabilities[digit], 6),
        "probabilities": [round(p, 6) for p in probabilities],
        "model_version": version,
    }
