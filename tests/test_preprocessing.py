"""preprocessing: what a person sends becomes the digit MNIST would have, or a clear error."""

from __future__ import annotations

import base64
import io
import json
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from digitserve import preprocessing, synthetic
from digitserve.preprocessing import (
    MNIST_MEAN,
    MNIST_STD,
    InvalidInput,
    digit_from_payload,
    normalize_digit,
    to_model_input,
)

pytestmark = pytest.mark.unit


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def mean_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


@pytest.fixture(scope="module")
def expected(seven) -> np.ndarray:
    return normalize_digit(seven)


# -- to_model_input --------------------------------------------------------------------------
def test_to_model_input_shape_dtype_and_channels(seven):
    batch = torch.from_numpy(np.stack([seven, 255 - seven, seven.T, seven[::-1].copy()]))
    out = to_model_input(batch)
    assert out.shape == (4, 3, 96, 96)
    assert out.dtype == torch.float32
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 0], out[:, 2])
    assert torch.equal(to_model_input(batch.unsqueeze(1)), out)


def test_to_model_input_normalises_with_mnist_statistics(seven):
    constant = torch.tensor([0, 255, 51], dtype=torch.uint8).view(3, 1, 1).expand(3, 28, 28)
    out = to_model_input(constant.contiguous())
    for index, value in enumerate((0, 255, 51)):
        want = (value / 255 - MNIST_MEAN) / MNIST_STD
        assert torch.allclose(out[index], torch.full((3, 96, 96), want), atol=1e-5)
    real = to_model_input(torch.from_numpy(seven[None].copy()))
    assert real.min() >= (0 - MNIST_MEAN) / MNIST_STD - 1e-5
    assert real.max() <= (1 - MNIST_MEAN) / MNIST_STD + 1e-5
    # The background really is background: the corners hold the value of a black pixel.
    assert torch.allclose(real[:, :, 0, 0], torch.tensor(-MNIST_MEAN / MNIST_STD), atol=1e-5)


def test_a_large_digit_is_scaled_into_the_mnist_box(seven, expected):
    big = np.asarray(Image.fromarray(255 - seven).resize((84, 84), Image.BICUBIC))
    canvas = np.full((150, 200), 255, dtype=np.uint8)
    canvas[20:104, 30:114] = big
    out = normalize_digit(canvas)
    rows = np.flatnonzero((out >= 32).any(axis=1))
    cols = np.flatnonzero((out >= 32).any(axis=0))
    assert max(rows[-1] - rows[0], cols[-1] - cols[0]) + 1 in (19, 20, 21)
    ys, xs = np.indices(out.shape)
    centre = ((ys * out).sum() / out.sum(), (xs * out).sum() / out.sum())
    assert np.allclose(centre, (14, 14), atol=1.0)
    assert np.corrcoef(out.ravel(), expected.ravel())[0, 1] > 0.9


# -- digit_from_payload: accepted inputs -----------------------------------------------------
def _formats(seven: np.ndarray) -> dict[str, tuple[bytes | str | list, float]]:
    """Each accepted encoding of test digit 0, with the largest mean pixel error it may have."""
    light = Image.fromarray(seven, mode="L")
    dark = Image.fromarray(255 - seven, mode="L")
    rgba_black_ink = np.zeros((28, 28, 4), dtype=np.uint8)
    rgba_black_ink[..., 3] = seven  # black ink whose opacity draws the digit
    rgba_white_ink = np.full((28, 28, 4), 255, dtype=np.uint8)
    rgba_white_ink[..., 3] = seven
    png = encode(light, "PNG")
    return {
        "png": (png, 0.0),
        "png dark ink": (encode(dark, "PNG"), 0.5),
        "png rgb": (encode(dark.convert("RGB"), "PNG"), 0.5),
        "png rgba black ink on transparent": (encode(Image.fromarray(rgba_black_ink), "PNG"), 1.0),
        "png rgba white ink on transparent": (encode(Image.fromarray(rgba_white_ink), "PNG"), 1.0),
        "png palette": (encode(dark.convert("RGB").convert("P", palette=Image.ADAPTIVE), "PNG"),
                        4.0),
        "png 16-bit": (encode(Image.fromarray(seven.astype(np.uint16) * 257), "PNG"), 0.5),
        "jpeg": (encode(dark, "JPEG", quality=95), 6.0),
        "bmp": (encode(light, "BMP"), 0.0),
        "gif": (encode(dark, "GIF"), 4.0),
        "webp lossless": (encode(dark, "WEBP", lossless=True), 0.5),
        "webp lossy": (encode(dark, "WEBP", quality=90), 8.0),
        "tiff": (encode(light, "TIFF"), 0.0),
        "base64 text": (base64.b64encode(png).decode(), 0.0),
        "base64 bytes": (base64.b64encode(png), 0.0),
        "json 0-255 text": (json.dumps(seven.tolist()), 0.0),
        "json 0-255 bytes": (json.dumps(seven.tolist()).encode(), 0.0),
        "json 0-1 text": (json.dumps((seven / 255).tolist()), 0.5),
        "pixel list 0-255": (seven.tolist(), 0.0),
        "pixel list 0-1": ((seven / 255).tolist(), 0.5),
        "dict with data": ({"data": png}, 0.0),
    }


FORMAT_NAMES = [
    "png", "png dark ink", "png rgb", "png rgba black ink on transparent",
    "png rgba white ink on transparent", "png palette", "png 16-bit", "jpeg", "bmp", "gif",
    "webp lossless", "webp lossy", "tiff", "base64 text", "base64 bytes", "json 0-255 text",
    "json 0-255 bytes", "json 0-1 text", "pixel list 0-255", "pixel list 0-1", "dict with data",
]


@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_accepted_payloads_give_the_digit(name, seven, expected):
    payload, tolerance = _formats(seven)[name]
    digit = digit_from_payload(payload)
    assert digit.dtype == np.uint8 and digit.shape == (28, 28)
    assert mean_abs(digit, expected) <= tolerance


def test_format_list_is_complete(seven):
    assert sorted(_formats(seven)) == sorted(FORMAT_NAMES)


# -- digit_from_payload: rejected inputs -----------------------------------------------------
def _huge_png(width: int, height: int) -> bytes:
    """A valid grayscale PNG of ``width``×``height`` black pixels, a few KB compressed."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return len(body).to_bytes(4, "big") + kind + body + crc.to_bytes(4, "big")

    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    rows = zlib.compress(bytes(height * (width + 1)), 9)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows)
            + chunk(b"IEND", b""))


def _bad_payloads(seven: np.ndarray) -> dict[str, tuple[object, str]]:
    png = encode(Image.fromarray(seven), "PNG")
    rng = np.random.default_rng(0)
    noise = b"\x00\xff" + rng.integers(0, 256, 2000, dtype=np.uint8).tobytes()
    blank = encode(Image.new("L", (28, 28), 255), "PNG")
    return {
        "empty bytes": (b"", "empty"),
        "empty text": ("   ", "empty"),
        "random bytes": (noise, "not an image"),
        "truncated png": (png[: len(png) // 2], "truncated or corrupt"),
        "blank image": (blank, "holds no digit"),
        "ragged list": ([[0, 1, 2], [3, 4]], "ragged"),
        "non-numbers": ([["a", "b"], ["c", "d"]], "ragged or holds non-numbers"),
        "1-d list": ([0, 255, 0, 255], r"shape \(4,\)"),
        "3-d list": ([[[0, 255]], [[255, 0]]], r"shape \(2, 1, 2\)"),
        "over 255": ([[0, 300], [0, 0]], "from 0 to 255"),
        "negative": ([[0, -1], [0, 200]], "from 0 to 255"),
        "nan": ([[0, float("nan")], [0, 200]], "finite"),
        "bad json": ("[[0, 1], [2,", "looks like JSON but is not"),
        "bad base64": ("this is not base64!", "neither a JSON pixel list nor base64"),
        "wrong type": (12345, "payload of type int"),
        "over max pixels": (_huge_png(2049, 2048), "over the kit's limit of 4,194,304"),
        "eps": (synthetic.EPS, "not an image the kit reads"),
        "ppm": (b"P5\n28 28\n255\n" + (255 - seven).tobytes(), "not an image the kit reads"),
        "json nested too deeply": ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
        "dict in dict": ({"data": {"data": png}}, "must be"),
        "dict without data": ({"image": png}, "must be"),
        "list over max pixels": ([[0] * 2049] * 2048, "2048×2049 = 4,196,352 pixels"),
    }


BAD_NAMES = [
    "empty bytes", "empty text", "random bytes", "truncated png", "blank image", "ragged list",
    "non-numbers", "1-d list", "3-d list", "over 255", "negative", "nan", "bad json",
    "bad base64", "wrong type", "over max pixels", "eps", "ppm", "json nested too deeply",
    "dict in dict", "dict without data", "list over max pixels",
]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_payloads_raise_invalid_input_with_a_message(name, seven):
    payload, message = _bad_payloads(seven)[name]
    with pytest.raises(InvalidInput, match=message):
        digit_from_payload(payload)


@pytest.mark.parametrize("cut", [16, 20])
def test_png_cut_inside_its_header_raises_invalid_input(seven, cut):
    png = encode(Image.fromarray(seven), "PNG")
    with pytest.raises(InvalidInput, match="truncated or corrupt|not an image"):
        digit_from_payload(png[:cut])


def test_bad_payload_list_is_complete(seven):
    assert sorted(_bad_payloads(seven)) == sorted(BAD_NAMES)


def test_huge_png_is_a_real_image_just_over_the_limit():
    """The limit test above is refused for its size, not because the PNG is malformed."""
    image = Image.open(io.BytesIO(_huge_png(2049, 2048)))
    assert image.size == (2049, 2048)
    assert image.width * image.height == preprocessing.MAX_IMAGE_PIXELS + 2048
    small = _huge_png(40, 30)
    with pytest.raises(InvalidInput, match="holds no digit"):  # decodes fine, it is just blank
        digit_from_payload(small)
    assert len(_huge_png(2049, 2048)) < 100_000


def test_invalid_input_is_a_value_error():
    assert issubclass(InvalidInput, ValueError)


# -- cost bounded before anything is built -------------------------------------------------------
def test_an_image_exactly_at_the_limit_is_decoded():
    """2048×2048 passes the size check and is decoded (then refused for being blank)."""
    side = int(preprocessing.MAX_IMAGE_PIXELS ** 0.5)
    assert side * side == preprocessing.MAX_IMAGE_PIXELS
    with pytest.raises(InvalidInput, match="holds no digit"):
        digit_from_payload(_huge_png(side, side))


def test_a_pixel_list_is_measured_before_an_array_is_built():
    """25 million pixels claimed by 5,000 references to one row: refused from the list's shape
    alone, before numpy builds the 100 MB array it describes."""
    row = [0] * 5000
    with pytest.raises(InvalidInput, match="5000×5000 = 25,000,000 pixels"):
        digit_from_payload([row] * 5000)
    with pytest.raises(InvalidInput, match=r"shape \(1, 0\)"):
        digit_from_payload([[]])


def _webp_claiming(width: int, height: int) -> bytes:
    """A 94-byte animated WebP whose canvas header claims width×height pixels (one 1×1 frame)."""
    def chunk(tag: bytes, body: bytes) -> bytes:
        return tag + len(body).to_bytes(4, "little") + body + b"\0" * (len(body) % 2)

    frame = encode(Image.new("RGBA", (1, 1), (255, 255, 255, 255)), "WEBP", lossless=True)[12:]
    canvas = (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    body = (b"WEBP" + chunk(b"VP8X", bytes([0x12, 0, 0, 0]) + canvas)
            + chunk(b"ANIM", bytes(6))
            + chunk(b"ANMF", bytes(12) + (100).to_bytes(3, "little") + b"\0" + frame))
    return b"RIFF" + len(body).to_bytes(4, "little") + body


def test_a_webp_canvas_over_the_limit_is_refused_from_its_header():
    with pytest.raises(InvalidInput, match="13000×13000 = 169,000,000 pixels, over the kit's"):
        digit_from_payload(_webp_claiming(13000, 13000))


GARBAGE = bytes(range(256)) * 64


def _second_frame_fails(data: bytes) -> bool:
    """True when decoding the second frame or page of ``data`` raises."""
    image = Image.open(io.BytesIO(data))
    try:
        image.seek(1)
        image.load()
    except Exception:  # noqa: BLE001 - Pillow raises several kinds for a broken frame
        return True
    return False


def test_only_the_first_gif_frame_is_decoded(seven, expected):
    """A GIF whose second frame is garbage still gives its first frame's digit: nothing after
    the first frame is decoded (asking Pillow for ``n_frames`` would walk every frame)."""
    gif = encode(Image.fromarray(255 - seven, "L"), "GIF")
    broken = gif[:-1] + b"\x2c" + GARBAGE  # the trailer replaced by a second image descriptor
    assert _second_frame_fails(broken)
    assert mean_abs(digit_from_payload(broken), expected) <= 4.0


def test_only_the_first_tiff_page_is_decoded(seven, expected):
    """The same for a TIFF whose second page (its second IFD) is garbage."""
    tiff = bytearray(encode(Image.fromarray(seven, "L"), "TIFF"))
    assert tiff[:4] == b"II*\0"
    first_ifd = int.from_bytes(tiff[4:8], "little")
    entries = int.from_bytes(tiff[first_ifd : first_ifd + 2], "little")
    next_pointer = first_ifd + 2 + 12 * entries
    tiff[next_pointer : next_pointer + 4] = len(tiff).to_bytes(4, "little")
    broken = bytes(tiff) + GARBAGE
    assert _second_frame_fails(broken)
    assert mean_abs(digit_from_payload(broken), expected) == 0.0


def test_formats_outside_the_list_are_not_parsed(seven):
    """PPM is a format Pillow decodes without help; the kit still refuses it."""
    ppm = b"P5\n28 28\n255\n" + seven.tobytes()
    assert Image.open(io.BytesIO(ppm)).format == "PPM"
    with pytest.raises(InvalidInput, match=r"not an image the kit reads \(PNG, JPEG"):
        digit_from_payload(ppm)


# -- messages --------------------------------------------------------------------------------
def test_quote_shows_client_text_short_and_printable():
    assert preprocessing.quote("data") == "'data'"
    assert preprocessing.quote("a\r\nb\x00") == "'a??b?'"
    long = preprocessing.quote("x" * 100_000)
    assert long == "'" + "x" * preprocessing.MAX_QUOTED_CHARS + "...'"
    assert preprocessing.quote("é" * 5) == "'?????'"


def test_bounded_message_is_one_short_line():
    message = preprocessing.bounded_message("line one\nline two\r\n" + "y" * 10_000)
    assert "\n" not in message and "\r" not in message
    assert len(message) == preprocessing.MAX_MESSAGE_CHARS and message.endswith("...")
    assert preprocessing.bounded_message("short") == "short"
