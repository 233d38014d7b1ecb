"""handler: reading a batch of requests the way TorchServe hands them to the worker."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from digitserve import handler
from digitserve.preprocessing import InvalidInput, digit_from_payload, normalize_digit

pytestmark = pytest.mark.unit


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def images(mnist_test) -> np.ndarray:
    return mnist_test[0][:3].numpy()


def test_payload_of_takes_data_then_body(images):
    first, second = png(images[0]), png(images[1])
    assert handler.payload_of({"data": first}) == first
    assert handler.payload_of({"body": second}) == second
    assert handler.payload_of({"data": first, "body": second}) == first
    assert handler.payload_of({"data": None, "body": second}) == second


def test_missing_key_names_the_keys_received_and_expected():
    with pytest.raises(InvalidInput) as raised:
        handler.payload_of({"image": b"x", "Content-Type": b"image/png"})
    message = str(raised.value)
    assert "'data'" in message and "body" in message
    assert "keys received: Content-Type, image" in message
    with pytest.raises(InvalidInput, match="keys received: none"):
        handler.payload_of({})


def test_mixed_batch_yields_digits_and_errors(images):
    batch = [
        {"data": png(images[0])},
        {"file": png(images[1])},
        {"body": bytearray(png(images[1]))},
        {"data": b""},
        {"data": b"\x00\x01 not an image at all"},
        {"data": images[2].tolist()},
        {"data": png(np.full((28, 28), 255, dtype=np.uint8))},
    ]
    digits, errors = handler.read_batch(batch)
    assert sorted(digits) == [0, 2, 5]
    assert sorted(errors) == [1, 3, 4, 6]
    for index, source in ((0, images[0]), (2, images[1]), (5, images[2])):
        assert np.array_equal(digits[index], normalize_digit(source))
    assert "keys received: file" in errors[1]
    assert "empty" in errors[3]
    assert "not an image" in errors[4]
    assert "holds no digit" in errors[6]
    for index in errors:  # the same message the payload alone would raise
        with pytest.raises(InvalidInput) as raised:
            digit_from_payload(handler.payload_of(batch[index]))
        assert str(raised.value) == errors[index]


def test_all_good_and_all_bad_batches(images):
    digits, errors = handler.read_batch([{"data": png(image)} for image in images])
    assert sorted(digits) == [0, 1, 2] and errors == {}
    digits, errors = handler.read_batch([{"data": b""}, {}])
    assert digits == {} and sorted(errors) == [0, 1]


def test_a_png_cut_in_its_header_fails_alone(images):
    batch = [{"data": png(images[0])}, {"data": png(images[1])[:16]}]
    digits, errors = handler.read_batch(batch)
    assert sorted(digits) == [0] and sorted(errors) == [1]
