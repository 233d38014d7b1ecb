"""The TorchServe handler archived into the .mar (it runs inside TorchServe's Python worker).

What it fixes from the blog recipe: softmax happens here, on logits; the answer is the argmax
itself (digits are 0–9, no ``+ 1``); the model is built without downloading anything; every
request is validated, and a bad one gets a clear message instead of "Prediction failed".

Streaming: every call gets exactly one answer, StreamPredictions included (a one-message
stream). The handler used to send the three likeliest digits first when the input map held
``stream``; but TorchServe 0.12.0 tells its Python worker nothing about which RPC a request came
from (the frontend's ``WorkerCommands`` value never crosses the socket, and Predictions and
StreamPredictions requests carry no headers), so the handler could not tell a stream from a
unary call, and an intermediate answer to a unary Predictions call made the frontend throw
("Stream is already completed"), drop the worker and time out every later call. A ``stream`` key
is now ignored. Every answer to a gRPC request is marked final (response header
``ts_stream_next: false``): TorchServe 0.12.0 ends a StreamPredictions call only on an answer so
marked, and would otherwise throw (NullPointerException) and kill the worker. Predictions
ignores the header; REST answers do not get it (there it would turn the response into a chunked
stream).

Limits: what a request may cost is checked before anything is built from it: at most
``MAX_INPUT_KEYS`` input keys of at most ``MAX_KEY_CHARS`` characters, one image of at most
``preprocessing.MAX_IMAGE_PIXELS`` pixels (from its header, before decoding), in one of
``preprocessing.IMAGE_FORMATS``; an OIP tensor's shape is checked before its values are read.
Error messages quote client text (key names, datatypes) shortened and in printable ASCII, and
are cut to ``preprocessing.MAX_MESSAGE_CHARS``.

Open Inference Protocol (KServe v2): with ``ts_open_inference_protocol=true`` TorchServe also
answers ``GRPCInferenceService/ModelInfer`` on the inference port and hands the handler
``{"body": {"id", "model_name", "inputs": [{"name", "shape", "datatype", "data"}]}}`` (BYTES
contents arrive base64-encoded, numbers as flat lists). Such a request holds one image: one BYTES
element (image bytes or JSON pixel text), or a pixel tensor of shape (28, 28), (1, 28, 28) or
(1, 1, 28, 28).
Its answer is a KServe v2 response, ``{"id", "model_name", "model_version", "outputs"}``, with
the outputs ``digit`` (INT64 [1]), ``probability`` (FP32 [1]) and ``probabilities`` (FP32 [10]).

Customized DescribeModel (``customized=True``) gets what the handler expects and answers, from
``describe_handle``: TorchServe puts it in the description as ``customizedMetadata``.

Errors: a request that is alone in its batch and cannot be read raises
``PredictionException(message, 400)``, which TorchServe sends over gRPC as INVALID_ARGUMENT.
Inside a batch of several, TorchServe 0.12.0's gRPC frontend ignores per-request status codes,
so a bad request gets the JSON body ``{"error": message, "code": 400}`` (its REST status is 400)
and its neighbours are answered normally; the kit's client raises the same exception for both.
A bad OIP request inside a batch gets a KServe v2 answer whose only output is ``error`` (BYTES),
because TorchServe turns every OIP answer into a ``ModelInferResponse``.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging

import numpy as np
import torch
import torch.nn.functional as F
from ts.torch_handler.base_handler import BaseHandler
from ts.utils.util import PredictionException

if __package__:  # imported from the installed package (tests, notebooks)
    from . import preprocessing
    from .model import for_serving
else:  # inside the .mar, TorchServe puts the archived files beside the handler
    import preprocessing
    from model import for_serving

logger = logging.getLogger(__name__)

#: Keys a request may carry its image under: gRPC's input map and REST's raw body.
PAYLOAD_KEYS = ("data", "body")
#: The most input keys one request may hold, and the longest key: a request needs one ("data").
MAX_INPUT_KEYS = 8
MAX_KEY_CHARS = 64


class DigitHandler(BaseHandler):
    """Image (or pixel list) in, ``{"digit", "probability", "probabilities"}`` out."""

    def initialize(self, context) -> None:
        """Load DigitCNN from the archived model file and weights, then prepare it for serving."""
        super().initialize(context)  # BaseHandler builds the model file's class, loads the weights
        batch_size = int(context.system_properties.get("batch_size") or 1)
        self.model = for_serving(self.model, preprocessing.IMAGE_SIZE, self.device,
                                 batch_sizes=(1, batch_size))
        self.version = context.manifest.get("model", {}).get("modelVersion", "")

    def handle(self, data: list[dict], context) -> list[str]:
        """Answer every request of the batch; a bad request fails alone."""
        if context.get_request_header(0, "describe") == "True":
            return [json.dumps(self.describe_handle())]
        try:
            digits, errors = read_batch(data)
        except Exception as err:  # noqa: BLE001 - anything unforeseen still gets a message
            message = f"could not read the request ({type(err).__name__})"
            raise PredictionException(message, 500) from err
        errors = {index: preprocessing.bounded_message(text) for index, text in errors.items()}
        if errors and len(data) == 1:
            raise PredictionException(errors[0], 400)
        answers: dict[int, dict] = {}
        if digits:
            indices = sorted(digits)
            batch = torch.from_numpy(np.stack([digits[i] for i in indices]))
            probabilities = self.predict_probabilities(batch)
            for index, row in zip(indices, probabilities.tolist(), strict=True):
                answers[index] = self.answer(row)
        for index, message in errors.items():
            context.set_response_status(400, message, idx=index)
            answers[index] = {"error": message, "code": 400}
        for index, request in enumerate(data):
            if is_oip(request):
                answers[index] = self.oip_answer(request["body"], answers[index],
                                                 context.request_ids[index])
            elif not came_over_http(context, index):
                context.set_response_header(index, "ts_stream_next", "false")
        return [json.dumps(answers[i]) for i in range(len(data))]

    def oip_answer(self, body: dict, answer: dict, request_id: str) -> dict:
        """The KServe v2 response for one OIP request (its ``id`` echoed, else TorchServe's)."""
        if "error" in answer:
            outputs = [_tensor("error", "BYTES", [answer["error"]])]
        else:
            outputs = [
                _tensor("digit", "INT64", [answer["digit"]]),
                _tensor("probability", "FP32", [answer["probability"]]),
                _tensor("probabilities", "FP32", answer["probabilities"]),
            ]
        return {
            "id": body.get("id") or request_id,
            "model_name": body.get("model_name", ""),
            "model_version": self.version,
            "outputs": outputs,
        }

    def describe_handle(self) -> dict:
        """What DescribeModel(customized=True) shows: the request and answer this handler knows."""
        return {
            "model_version": self.version,
            "input": "one image per request under 'data': PNG/JPEG/BMP/GIF/WebP/TIFF bytes, "
                     "base64 text, or a JSON list of pixel rows (0-255 or 0-1)",
            "output": {"digit": "0-9, the argmax", "probability": "of that digit",
                       "probabilities": "softmax over the ten digits"},
            "open_inference_protocol": {
                "input": "one BYTES element (an image), or a pixel tensor [28, 28], "
                         "[1, 28, 28] or [1, 1, 28, 28]",
                "outputs": {"digit": "INT64 [1]", "probability": "FP32 [1]",
                            "probabilities": "FP32 [10]"},
            },
            "streaming": "StreamPredictions answers like Predictions: one message, the answer",
            "limits": {"max_image_pixels": preprocessing.MAX_IMAGE_PIXELS,
                       "image_formats": list(preprocessing.IMAGE_FORMATS),
                       "max_input_keys": MAX_INPUT_KEYS, "max_key_chars": MAX_KEY_CHARS,
                       "max_message_chars": preprocessing.MAX_MESSAGE_CHARS},
            "preprocessing": {"image_size": preprocessing.IMAGE_SIZE,
                              "mean": preprocessing.MNIST_MEAN, "std": preprocessing.MNIST_STD},
        }

    @torch.inference_mode()
    def predict_probabilities(self, digits: torch.Tensor) -> torch.Tensor:
        """Softmax over the model's logits for uint8 digits (N, 28, 28)."""
        inputs = preprocessing.to_model_input(digits).to(
            self.device, memory_format=torch.channels_last
        )
        return F.softmax(self.model(inputs).float(), dim=1).cpu()

    def answer(self, probabilities: list[float]) -> dict:
        """The JSON answer for one image (``preprocessing.answer``: the digit is the argmax)."""
        return preprocessing.answer(probabilities, self.version)


def read_batch(data: list[dict]) -> tuple[dict, dict]:
    """Split a batch into readable digits and error messages, both keyed by request index."""
    digits, errors = {}, {}
    for index, request in enumerate(data):
        try:
            digits[index] = preprocessing.digit_from_payload(payload_of(request))
        except preprocessing.InvalidInput as err:
            errors[index] = str(err)
        except Exception as err:  # noqa: BLE001 - one unreadable request must not fail the batch
            errors[index] = (f"the handler could not read this request ({type(err).__name__}: "
                             f"{preprocessing.quote(str(err), 80)})")
    return digits, errors


def payload_of(request: dict) -> object:
    """The image in one request, or an error that names the keys that came and those expected."""
    check_keys(request)
    if is_oip(request):
        return oip_payload(request["body"])
    for key in PAYLOAD_KEYS:
        if key in request and request[key] is not None:
            return request[key]
    came = ", ".join(sorted(preprocessing.quote(key)[1:-1] for key in request)) or "none"
    raise preprocessing.InvalidInput(
        f"no image in the request: expected the key 'data' (gRPC input map) or a request body; "
        f"keys received: {came}"
    )


def check_keys(request: dict) -> None:
    """Refuse a request with more input keys than ``MAX_INPUT_KEYS`` or a key too long."""
    if len(request) > MAX_INPUT_KEYS:
        raise preprocessing.InvalidInput(
            f"the request holds {len(request):,} input keys; at most {MAX_INPUT_KEYS} are "
            "accepted: send the image under 'data' alone"
        )
    for key in request:
        if len(str(key)) > MAX_KEY_CHARS:
            raise preprocessing.InvalidInput(
                f"an input key is {len(str(key)):,} characters long "
                f"({preprocessing.quote(key, 20)}); keys are at most {MAX_KEY_CHARS}: "
                "send the image under 'data'"
            )


def came_over_http(context, index: int) -> bool:
    """True for a REST request: TorchServe passes its HTTP headers (``Host`` among them) along."""
    properties = context.get_all_request_header(index) or {}
    return any(isinstance(value, str) and str(key).lower() == "host"
               for key, value in properties.items())


def is_oip(request: dict) -> bool:
    """True for an Open Inference Protocol request: a JSON body with a list of input tensors."""
    body = request.get("body")
    return isinstance(body, dict) and isinstance(body.get("inputs"), list)


def oip_payload(body: dict) -> object:
    """The image of an OIP request: image bytes (from BYTES) or a list of pixel rows.

    BYTES contents come base64-encoded from TorchServe: one element is checked before it is
    decoded. The tensor is then read by ``preprocessing.payload_from_tensor``, which checks its
    shape before anything is built from it (as for KServe and the Ray cluster).
    """
    inputs = body["inputs"]
    if len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise preprocessing.InvalidInput(
            f"an Open Inference Protocol request must hold exactly one input tensor; "
            f"it holds {len(inputs):,}"
        )
    tensor = inputs[0]
    datatype, data = tensor.get("datatype"), tensor.get("data")
    data = [] if data is None else data
    if not isinstance(data, list):
        raise preprocessing.InvalidInput("the input tensor's data is not a list of values")
    if datatype == "BYTES":
        if len(data) != 1 or not isinstance(data[0], str):
            raise preprocessing.InvalidInput(
                f"the BYTES input holds {len(data):,} elements: send one image per request"
            )
        try:  # TorchServe base64-encodes BYTES contents before they reach the handler
            data = [base64.b64decode(data[0], validate=True)]  # one element, checked above
        except (binascii.Error, ValueError, TypeError):
            raise preprocessing.InvalidInput("the BYTES input is not base64 image data") from None
    return preprocessing.payload_from_tensor(datatype, tensor.get("shape"), data)


def _tensor(name: str, datatype: str, data: list) -> dict:
    return {"name": name, "datatype": datatype, "shape": [len(data)], "data": data}
