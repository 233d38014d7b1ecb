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
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

IMAGE_SIZE = 96
MNIST_SIZE = 28
MNIST_BOX = 20
#: Mean and standard deviation of MNIST training pixels scaled to [0, 1].
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081
#: The formats the kit reads: Pillow tries no other decoder (EPS would run Ghostscript, where
#: installed; PSD, ICO, ... are never parsed).
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "WEBP", "TIFF")
#: The largest image the kit decodes, in pixels (2048×2048): what keeps one request's cost
#: small. A digit needs 20×20 pixels; a drawing canvas, a full-HD screenshot or a phone photo
#: scaled to 2048 pixels on its longer side fit. ``digitserve.worst_case`` measures the time and
#: memory of a request at this limit.
MAX_IMAGE_PIXELS = 2048 * 2048
#: A pixel counts as ink when it is this much brighter than the background (0–255 scale).
INK_THRESHOLD = 32
#: Characters of client text (a key name, a datatype) that an error message quotes.
MAX_QUOTED_CHARS = 40
#: The longest error message the handler sends (gRPC trailers and HTTP headers stay small).
MAX_MESSAGE_CHARS = 300


_over_the_limit = (
    f"over the kit's limit of {MAX_IMAGE_PIXELS:,} pixels (2048×2048, a guard against "
    "decompression bombs): a digit needs far fewer, so scale the image down before sending it"
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
    gray = gray.astype(np.float32)  # a copy: the steps below work in place on it
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    if np.median(border) > 127:
        np.subtract(255.0, gray, out=gray)
        border = 255.0 - border
    if gray.max() - np.median(border) < INK_THRESHOLD:
        raise InvalidInput(
            "the image holds no digit: every pixel is within "
            f"{INK_THRESHOLD}/255 of the background"
        )
    threshold = otsu_threshold(gray)
    ground = min(float(np.percentile(border, 99)), threshold)
    ink_level = float(np.percentile(gray[gray >= threshold], 90))
    ink = gray  # from here on, the same buffer holds the ink level (0-255) of every pixel
    ink -= ground
    ink /= max(ink_level - ground, 1.0)
    np.clip(ink, 0.0, 1.0, out=ink)
    ink *= 255.0
    inked = ink >= INK_THRESHOLD
    rows = np.flatnonzero(inked.any(axis=1))
    cols = np.flatnonzero(inked.any(axis=0))
    del inked
    box = torch.from_numpy(ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].copy())
    del ink, gray
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
    JSON text or a list of pixel rows (H×W, values 0–255 or 0–1), or ``{"data": <any of
    those>}``. Every size is checked before anything is built from it (see ``MAX_IMAGE_PIXELS``).
    """
    if isinstance(payload, dict):
        if "data" not in payload or isinstance(payload["data"], dict):
            raise InvalidInput("a JSON object payload must be {\"data\": <image or pixel rows>}")
        payload = payload["data"]
    if isinstance(payload, (bytes, bytearray)):
        data = bytes(payload)
        if not data:
            raise InvalidInput("the payload is empty: send the bytes of an image")
        if _looks_like_text(data):
            try:
                return digit_from_payload(data.decode("utf-8"))
            except UnicodeDecodeError:
                raise InvalidInput("the payload looks like text but is not UTF-8") from None
        return normalize_digit(_gray_pixels(_open_image(data)))
    if isinstance(payload, str):
        text = payload.strip()
        if not text:
            raise InvalidInput("the payload is empty: send the bytes of an image")
        if text[0] in "[{":
            return digit_from_payload(_json_value(text))
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidInput(
                "the payload is text but neither a JSON pixel list nor base64 image data"
            ) from None
        if not data:
            raise InvalidInput("the payload is empty: send the bytes of an image")
        return normalize_digit(_gray_pixels(_open_image(data)))
    if isinstance(payload, list):
        return normalize_digit(_pixels_from_list(payload))
    raise InvalidInput(f"cannot read a digit from a payload of type {type(payload).__name__}")


def quote(value: object, limit: int = MAX_QUOTED_CHARS) -> str:
    """Client text as an error message may show it: printable ASCII, at most ``limit`` chars."""
    try:
        text = value if isinstance(value, str) else repr(value)
    except ValueError:  # an integer of more than 4,300 digits
        text = f"<{type(value).__name__} too long to show>"
    clean = "".join(c if " " <= c <= "~" else "?" for c in text[: limit + 1])
    return repr(clean[:limit] + "...") if len(text) > limit else repr(clean)


def bounded_message(message: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """An error message fit for a gRPC trailer or an HTTP reason phrase: one line, bounded."""
    line = "".join(c if c.isprintable() else " " for c in message[: limit + 1])
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _json_value(text: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise InvalidInput(f"the payload looks like JSON but is not: {err}") from None
    except RecursionError:
        raise InvalidInput("the JSON payload is nested too deeply: send a list of rows") from None


def _looks_like_text(data: bytes) -> bool:
    """True for JSON or base64 text; image formats all start with a binary signature."""
    head = data[:64].lstrip()
    return (bool(head) and head[:1] in b"[{") or _is_base64_head(head)


def _is_base64_head(head: bytes) -> bool:
    alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=\r\n"
    return len(head) >= 8 and all(byte in alphabet for byte in head)


def _open_image(data: bytes) -> Image.Image:
    """Open ``data`` as one of ``IMAGE_FORMATS`` and decode its first frame, within the limit.

    Pillow reads only the header in ``Image.open``; the size is checked before ``load`` decodes
    anything. ``load`` decodes the first frame of a GIF, WebP or TIFF only (asking for
    ``n_frames`` would read every frame: never done here).
    """
    try:
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except Image.DecompressionBombError:  # Pillow's own, far larger, limit: one message
        raise InvalidInput(f"the image's header claims {_over_the_limit}") from None
    except MemoryError:
        raise
    except Exception:  # noqa: BLE001 - Pillow raises many kinds for bytes it cannot parse
        raise InvalidInput(
            f"the {len(data):,} bytes sent are not an image the kit reads "
            f"({', '.join(IMAGE_FORMATS)})"
        ) from None
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
        raise InvalidInput(f"the image is {width}×{height} = {width * height:,} pixels, "
                           f"{_over_the_limit}")
    try:
        image.load()
    except MemoryError:
        raise
    except Exception as err:  # noqa: BLE001 - truncated or corrupt data, in any decoder
        raise InvalidInput(
            f"the {image.format} image is truncated or corrupt: {quote(str(err), 80)}"
        ) from None
    return image


def _gray_pixels(image: Image.Image) -> np.ndarray:
    """Grayscale pixels 0–255 of any mode; transparency is laid over a ground that shows the ink.

    At most two float32 arrays of the image's size exist at once (8 bytes a pixel).
    """
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        pixels = np.asarray(image, dtype=np.float32).copy()
        top = 65535.0 if image.mode.startswith("I;16") else max(float(pixels.max()), 1.0)
        np.clip(pixels * (255.0 / top), 0, 255, out=pixels)
        return pixels
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        alpha = np.asarray(rgba.getchannel("A"), dtype=np.float32) / 255.0
        luminance = np.asarray(rgba.convert("L"), dtype=np.float32)
        del rgba
        opaque = alpha > 0.5
        ink_mean = float(luminance.mean(where=opaque)) if opaque.any() else 255.0
        del opaque
        ground = 255.0 if ink_mean < 128 else 0.0
        luminance *= alpha  # luminance × alpha + ground × (1 − alpha)
        if ground:
            alpha *= -ground
            alpha += ground
            luminance += alpha
        return luminance
    return np.asarray(image.convert("L"), dtype=np.float32)


def _pixels_from_list(rows: list) -> np.ndarray:
    """Pixel rows as float32 0–255; the list's size is checked before any array is built."""
    shape = _nominal_shape(rows)
    if len(shape) != 2 or min(shape) < 1:
        shown = "(" + ", ".join(map(str, shape)) + ("," if len(shape) == 1 else "") + ")"
        raise InvalidInput(
            f"the pixel list has shape {shown}: expected a 2-D list of rows, e.g. 28×28"
        )
    if shape[0] * shape[1] > MAX_IMAGE_PIXELS:
        raise InvalidInput(f"the pixel list is {shape[0]}×{shape[1]} = "
                           f"{shape[0] * shape[1]:,} pixels, {_over_the_limit}")
    try:
        pixels = np.asarray(rows, dtype=np.float32)
    except (TypeError, ValueError, OverflowError):
        raise InvalidInput(
            "the pixel list is ragged or holds non-numbers: send rows of equal length"
        ) from None
    if pixels.shape != shape:
        raise InvalidInput("the pixel list is ragged: send rows of equal length")
    if not np.isfinite(pixels).all() or pixels.min() < 0 or pixels.max() > 255:
        raise InvalidInput("pixel values must be finite numbers from 0 to 255 (or 0 to 1)")
    if pixels.max() <= 1.0:
        pixels *= 255.0
    return pixels


def _nominal_shape(value: object, depth: int = 4) -> tuple[int, ...]:
    """The shape a nested list claims, read from its first elements (at most ``depth`` levels)."""
    shape = []
    while isinstance(value, (list, tuple)) and len(shape) < depth:
        shape.append(len(value))
        if not value:
            break
        value = value[0]
    return tuple(shape)


#: Open Inference Protocol datatypes a pixel tensor may have (BYTES carries an encoded image).
OIP_PIXEL_TYPES = ("UINT8", "UINT16", "UINT32", "INT8", "INT16", "INT32", "INT64", "FP32", "FP64")
#: The most dimensions an OIP pixel tensor may have: [28, 28], [1, 28, 28] or, as a torch
#: client sends one grey image (N, C, H, W), [1, 1, 28, 28].
OIP_MAX_DIMS = 4


def payload_from_tensor(datatype: object, shape: object, data: object) -> bytes | list:
    """The image of one Open Inference Protocol input tensor, for ``digit_from_payload``.

    BYTES: exactly one element, the image bytes (decoded from base64 by the caller where the
    server sends them so). A pixel tensor: its shape is checked (at most ``OIP_MAX_DIMS`` sizes,
    each at least 1, their product within ``MAX_IMAGE_PIXELS`` and equal to the number of flat
    values) before anything is built from it. Every server of the kit reads tensors here.
    """
    if not isinstance(data, list):
        raise InvalidInput("the input tensor's data is not a list of values")
    if datatype == "BYTES":
        if len(data) != 1 or not isinstance(data[0], (str, bytes)):
            raise InvalidInput(
                f"the BYTES input holds {len(data):,} elements: send one image per request"
            )
        element = data[0]
        return element.encode("utf-8") if isinstance(element, str) else bytes(element)
    if datatype not in OIP_PIXEL_TYPES:
        raise InvalidInput(
            f"input datatype {quote(datatype)} is not supported: send BYTES (an image) or a "
            f"pixel tensor of one of {', '.join(OIP_PIXEL_TYPES)}"
        )
    height, width = oip_image_shape(shape, len(data))
    return [data[row * width : (row + 1) * width] for row in range(height)]


def oip_image_shape(shape: object, n_values: int) -> tuple[int, int]:
    """(height, width) of an OIP pixel tensor, from its shape, or ``InvalidInput``."""
    expected = ("expected one image, shape [28, 28], [1, 28, 28] or [1, 1, 28, 28], with as many "
                "values as the shape says")
    if (not isinstance(shape, list) or not 2 <= len(shape) <= OIP_MAX_DIMS
            or not all(type(size) is int and 1 <= size <= MAX_IMAGE_PIXELS for size in shape)):
        shown = quote(shape, 60) if not isinstance(shape, list) else (
            "[" + ", ".join(quote(size, 12).strip("'") for size in shape[:4])
            + (f", ... ({len(shape):,} sizes)" if len(shape) > 4 else "") + "]")
        raise InvalidInput(
            f"the pixel tensor's shape {shown} is not an image's: it takes 2 to {OIP_MAX_DIMS} "
            f"whole sizes from 1 to {MAX_IMAGE_PIXELS:,}; " + expected
        )
    rows = [size for size in shape if size != 1] if len(shape) > 2 else shape
    if len(rows) != 2:
        raise InvalidInput(f"the pixel tensor has shape {shape}: {expected}")
    if rows[0] * rows[1] > MAX_IMAGE_PIXELS:
        raise InvalidInput(
            f"the pixel tensor is {rows[0]:,}×{rows[1]:,} pixels, over the kit's limit of "
            f"{MAX_IMAGE_PIXELS:,}: a digit needs far fewer"
        )
    if rows[0] * rows[1] != n_values:
        raise InvalidInput(
            f"the pixel tensor has shape {shape} and {n_values:,} values: {expected}"
        )
    return rows[0], rows[1]


def answer(probabilities: list[float], version: str = "") -> dict:
    """The JSON answer for one image: the digit is the argmax, 0–9 (every server sends this)."""
    digit = max(range(10), key=probabilities.__getitem__)
    return {
        "digit": digit,
        "probability": round(probabilities[digit], 6),
        "probabilities": [round(p, 6) for p in probabilities],
        "model_version": version,
    }
