"""The TorchServe handler archived into the .mar (it runs inside TorchServe's Python worker).

What it fixes from the blog recipe: softmax happens here, on logits; the answer is the argmax
itself (digits are 0–9, no ``+ 1``); the model is built without downloading anything; every
request is validated, and a bad one gets a clear message instead of "Prediction failed".

Streaming: a request whose input map also holds ``stream`` (any value) and arrives through
StreamPredictions first gets ``{"stage": "top3", "top": [...]}`` (the three likeliest digits)
as an intermediate response, then the full answer. Only ask for it on StreamPredictions: a unary
Predictions call completes with the first response it gets.

Errors: a request that is alone in its batch and cannot be read raises
``PredictionException(message, 400)``, which TorchServe sends over gRPC as INVALID_ARGUMENT.
Inside a batch of several, TorchServe 0.12.0's gRPC frontend ignores per-request status codes,
so a bad request gets the JSON body ``{"error": message, "code": 400}`` (its REST status is 400)
and its neighbours are answered normally; the kit's client raises the same exception for both.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import torch
import torch.nn.functional as F
from ts.handler_utils.utils import send_intermediate_predict_response
from ts.torch_handler.base_handler import BaseHandler
from ts.utils.util import PredictionException

if __package__:  # imported from the installed package (tests, notebooks)
    from . import preprocessing
else:  # inside the .mar, TorchServe puts the archived files beside the handler
    import preprocessing

logger = logging.getLogger(__name__)

#: Keys a request may carry its image under: gRPC's input map and REST's raw body.
PAYLOAD_KEYS = ("data", "body")


class DigitHandler(BaseHandler):
    """Image (or pixel list) in, ``{"digit", "probability", "probabilities"}`` out."""

    def initialize(self, context) -> None:
        """Load DigitCNN from the archived model file and weights (BaseHandler does the work)."""
        super().initialize(context)
        self.model = self.model.to(memory_format=torch.channels_last)
        self.version = context.manifest.get("model", {}).get("modelVersion", "")

    def handle(self, data: list[dict], context) -> list[str]:
        """Answer every request of the batch; a bad request fails alone."""
        try:
            digits, errors = read_batch(data)
        except Exception as err:  # noqa: BLE001 - anything unforeseen still gets a message
            raise PredictionException(f"could not read the request: {err}", 500) from err
        if errors and len(data) == 1:
            raise PredictionException(errors[0], 400)
        answers: dict[int, dict] = {}
        if digits:
            indices = sorted(digits)
            batch = torch.from_numpy(np.stack([digits[i] for i in indices]))
            probabilities = self.predict_probabilities(batch)
            for index, row in zip(indices, probabilities.tolist(), strict=True):
                answers[index] = self.answer(row)
            streamed = {i: context.request_ids[i] for i in indices if "stream" in data[i]}
            if streamed:
                first = {i: json.dumps(top_classes(answers[i]["probabilities"])) for i in streamed}
                send_intermediate_predict_response(first, streamed, "top3", 200, context)
        for index, message in errors.items():
            context.set_response_status(400, message, idx=index)
            answers[index] = {"error": message, "code": 400}
        return [json.dumps(answers[i]) for i in range(len(data))]

    @torch.inference_mode()
    def predict_probabilities(self, digits: torch.Tensor) -> torch.Tensor:
        """Softmax over the model's logits for uint8 digits (N, 28, 28)."""
        inputs = preprocessing.to_model_input(digits).to(
            self.device, memory_format=torch.channels_last
        )
        return F.softmax(self.model(inputs).float(), dim=1).cpu()

    def answer(self, probabilities: list[float]) -> dict:
        """The JSON answer for one image: the digit is the argmax, 0–9."""
        digit = max(range(10), key=probabilities.__getitem__)
        return {
            "digit": digit,
            "probability": round(probabilities[digit], 6),
            "probabilities": [round(p, 6) for p in probabilities],
            "model_version": self.version,
        }


def top_classes(probabilities: list[float], k: int = 3) -> dict:
    """The ``k`` likeliest digits: what a stream sends before the full answer."""
    ranked = sorted(range(10), key=probabilities.__getitem__, reverse=True)[:k]
    top = [{"digit": digit, "probability": probabilities[digit]} for digit in ranked]
    return {"stage": f"top{k}", "top": top}


def read_batch(data: list[dict]) -> tuple[dict, dict]:
    """Split a batch into readable digits and error messages, both keyed by request index."""
    digits, errors = {}, {}
    for index, request in enumerate(data):
        try:
            digits[index] = preprocessing.digit_from_payload(payload_of(request))
        except preprocessing.InvalidInput as err:
            errors[index] = str(err)
    return digits, errors


def payload_of(request: dict) -> object:
    """The image in one request, or an error that names the keys that came and those expected."""
    for key in PAYLOAD_KEYS:
        if key in request and request[key] is not None:
            return request[key]
    came = ", ".join(sorted(map(str, request))) or "none"
    raise preprocessing.InvalidInput(
        f"no image in the request: expected the key 'data' (gRPC input map) or a request body; "
        f"keys received: {came}"
    )
