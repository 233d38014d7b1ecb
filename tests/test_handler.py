"""handler: reading a batch of requests the way TorchServe hands them to the worker."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from digitserve import handler, preprocessing
from digitserve.preprocessing import InvalidInput, digit_from_payload, normalize_digit

pytestmark = pytest.mark.unit


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    """Three digits drawn in code (a 1, a 7, a 0): reading requests needs no MNIST."""
    one, seven = _drawn_digit(), np.zeros((28, 28), dtype=np.uint8)
    seven[5:9, 7:21] = 255
    for row in range(9, 23):
        column = 19 - (row - 9) // 2
        seven[row, column - 2:column + 2] = 255
    rows, columns = np.ogrid[:28, :28]
    distance = np.hypot(rows - 14, (columns - 14) * 1.4)
    zero = ((distance > 6) & (distance < 10)).astype(np.uint8) * 255
    return np.stack([one, seven, zero])


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


# -- what a request may cost, and what its error may say ----------------------------------------
def _drawn_digit() -> np.ndarray:
    """A "1" drawn in code: tests below need a readable image but no MNIST."""
    digit = np.zeros((28, 28), dtype=np.uint8)
    digit[5:23, 12:16] = 255
    return digit


def test_input_keys_are_counted_and_measured():
    image = png(_drawn_digit())
    most = {"data": image, **{f"k{i}": b"" for i in range(handler.MAX_INPUT_KEYS - 1)}}
    assert handler.payload_of(most) == image
    with pytest.raises(InvalidInput, match=f"holds {handler.MAX_INPUT_KEYS + 1} input keys"):
        handler.payload_of({**most, "one more": b""})
    longest = "k" * handler.MAX_KEY_CHARS
    assert handler.payload_of({"data": image, longest: b""}) == image
    with pytest.raises(InvalidInput, match="65 characters long") as raised:
        handler.payload_of({"data": image, longest + "k": b""})
    assert len(str(raised.value)) < 200


def _oip(tensor: dict) -> dict:
    return {"id": "", "model_name": "digitmodel", "inputs": [{"name": "x", **tensor}]}


#: OIP pixel tensors that must be refused from their shape or datatype alone, before any list or
#: array is built (``[N, 0]`` once built N empty rows: 2 GB for N = 20 million), with the phrase
#: their message holds. The frontend sends gRPC shapes as whole numbers; REST JSON may send any.
OIP_REFUSED = {
    "no values, a million empty rows": ({"datatype": "UINT8", "shape": [10**6, 0]}, "whole sizes"),
    "negative sizes": ({"datatype": "UINT8", "shape": [-28, -28], "data": [0] * 784},
                       "shape [-28, -28] is not an image's"),
    "1,000 sizes": ({"datatype": "UINT8", "shape": [1] * 998 + [28, 28], "data": [0] * 784},
                    "(1,000 sizes)"),
    "sizes of 2**62": ({"datatype": "UINT8", "shape": [2**62, 2**62]}, "[461168601842..., 4"),
    "a size of 10**10000": ({"datatype": "UINT8", "shape": [10**10000, 1]}, "[<int too lon..., 1]"),
    "fractional sizes": ({"datatype": "FP32", "shape": [28.0, 28.0], "data": [0.0] * 784},
                         "whole sizes"),
    "a shape that is text": ({"datatype": "UINT8", "shape": "28x28" * 1000}, "'28x2828x28"),
    "over the pixel limit": ({"datatype": "UINT8", "shape": [2049, 2048]}, "over the kit's limit"),
    "a long datatype": ({"datatype": "X" * 100_000, "shape": [28, 28]}, "'XXXXXXXXXX"),
    "data that is no list": ({"datatype": "UINT8", "shape": [28, 28], "data": "0" * 784},
                             "not a list"),
}


@pytest.mark.parametrize("case", sorted(OIP_REFUSED))
def test_oip_shapes_are_checked_before_anything_is_built(case):
    tensor, phrase = OIP_REFUSED[case]
    with pytest.raises(InvalidInput) as raised:
        handler.oip_payload(_oip(tensor))
    message = str(raised.value)
    assert phrase in message, message
    assert len(message) < preprocessing.MAX_MESSAGE_CHARS


def test_oip_pixel_values_are_numbers_and_finite():
    rows = {"datatype": "FP32", "shape": [28, 28]}
    digit = _drawn_digit().astype(float)
    assert np.array_equal(digit_from_payload(handler.oip_payload(
        _oip({**rows, "data": digit.ravel().tolist()}))), normalize_digit(digit))
    with pytest.raises(InvalidInput, match="finite"):  # REST JSON may carry NaN
        digit_from_payload(handler.oip_payload(_oip({**rows, "data": [float("nan")] * 784})))
    with pytest.raises(InvalidInput, match="non-numbers"):
        digit_from_payload(handler.oip_payload(_oip({**rows, "data": ["one"] * 784})))


# -- the handler as TorchServe's worker calls it -------------------------------------------------
@pytest.fixture(scope="module")
def digit_handler():
    """The handler with an untrained DigitCNN: enough to see what it answers, not how well."""
    from digitserve.model import DigitCNN

    torch.manual_seed(0)
    instance = handler.DigitHandler()
    instance.model, instance.device, instance.version = DigitCNN().eval(), "cpu", "1.0"
    return instance


def worker_call(digit_handler, requests: list[dict[str, bytes]]):
    """Hand ``requests`` (gRPC input maps) to the handler the way TorchServe 0.12.0's worker
    does: through ``Service.retrieve_data_for_inference`` and a real ``Context``, which has no
    frontend socket here, so any attempt to send an intermediate answer would fail."""
    from ts.context import Context
    from ts.service import Service

    batch = [{"requestId": f"id-{index}".encode(), "headers": [],
              "parameters": [{"name": key, "contentType": "", "value": value}
                             for key, value in inputs.items()]}
             for index, inputs in enumerate(requests)]
    headers, inputs, ids = Service.retrieve_data_for_inference(batch)
    context = Context("digitmodel", "/nonexistent", {"model": {"modelVersion": "1.0"}},
                      len(requests), None, "0.12.0")
    context.request_ids, context.request_processor = ids, headers
    return digit_handler.handle(inputs, context), context


def test_a_stream_key_gets_one_final_answer_and_nothing_before_it(digit_handler):
    """The case that wedged TorchServe: ``stream`` in a unary call's input map. The handler
    answers once, marked final, and never writes an intermediate answer to the frontend."""
    image = png(_drawn_digit())
    answers, context = worker_call(digit_handler, [{"data": image, "stream": b"1"},
                                                   {"data": image}])
    assert len(answers) == 2 and answers[0] == answers[1]
    assert json.loads(answers[0])["digit"] in range(10)
    for index in range(2):
        assert context.get_response_headers(index) == {"ts_stream_next": "false"}


def test_errors_in_a_batch_are_one_bounded_line_each(digit_handler):
    """Client text in a batch's error bodies and status phrases (REST sends the phrase as its
    HTTP reason phrase, where a line break would break the response) is cut and cleaned."""
    dirty = {"a\r\nHTTP/1.1 200 OK\r\n" + "x" * 40: png(_drawn_digit())}
    answers, context = worker_call(digit_handler, [{"data": png(_drawn_digit())}, dirty])
    error = json.loads(answers[1])["error"]
    assert "keys received: a??HTTP/1.1 200 OK??xxx" in error
    code, phrase = context.get_response_status(1)
    assert code == 400 and phrase == error
    assert error.isprintable() and len(error) <= preprocessing.MAX_MESSAGE_CHARS
    assert "digit" in json.loads(answers[0])


def test_a_lone_bad_request_raises_a_bounded_prediction_exception(digit_handler):
    from ts.utils.util import PredictionException

    keys = {f"key-{i:02d}-" + "z" * 56: b"" for i in range(handler.MAX_INPUT_KEYS)}
    with pytest.raises(PredictionException) as raised:
        worker_call(digit_handler, [keys])
    assert raised.value.error_code == 400
    assert "keys received: key-00-zzz" in raised.value.message
    assert len(raised.value.message) == preprocessing.MAX_MESSAGE_CHARS
    assert raised.value.message.endswith("...")


# -- the files shipped in the .mar ----------------------------------------------------------------
def test_the_archived_files_import_without_the_package(tmp_path):
    """model.py, handler.py and preprocessing.py run inside TorchServe's worker, where the
    ``digitserve`` package is not importable: copied alone into a folder, with the package
    blocked, they must import (handler.py's ``if __package__`` switch takes its siblings)."""
    import shutil
    import subprocess
    import sys

    from digitserve import archive

    shipped = [archive.MODEL_FILE, archive.HANDLER_FILE, *archive.EXTRA_FILES]
    assert sorted(path.name for path in shipped) == ["handler.py", "model.py", "preprocessing.py"]
    for path in shipped:
        shutil.copy(path, tmp_path / path.name)
        text = path.read_text()
        assert "import digitserve" not in text and "from digitserve" not in text, path.name
    probe = ("import sys; sys.modules['digitserve'] = None\n"
             "import handler, model, preprocessing\n"
             "assert handler.preprocessing is preprocessing\n"
             "assert handler.DigitHandler and model.DigitCNN\n"
             "print('imported alone')")
    done = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env={"PATH": "", "PYTHONPATH": str(tmp_path)})
    assert done.returncode == 0 and "imported alone" in done.stdout, done.stderr[-2000:]
    # ...and imported from the package, the handler uses the package's own modules.
    assert handler.preprocessing is preprocessing
