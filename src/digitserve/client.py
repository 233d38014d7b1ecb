"""A gRPC client for the served DigitCNN: one channel per server, token metadata, deadlines.

Every call carries ``authorization: Bearer <key>`` (TorchServe 0.12.0 enforces tokens, on gRPC
too, Ping included) and a deadline; every failure becomes a ``ServingError`` subclass whose
message says what happened and what to do.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import grpc
from google.protobuf import empty_pb2

from digitserve.config import HOST, MAX_MESSAGE_BYTES, MODEL_NAME, RPC_DEADLINE_S, RUN_DIR
from digitserve.grpc_stubs import (
    inference_pb2,
    inference_pb2_grpc,
    management_pb2,
    management_pb2_grpc,
)

#: Channel options shared by every channel the kit opens: message sizes match the server's
#: ``max_request_size``; keepalive pings find a dead server between calls.
CHANNEL_OPTIONS = (
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.enable_retries", 1),
    # Predictions are idempotent: retry them when a worker is briefly UNAVAILABLE (restarting).
    ("grpc.service_config", json.dumps({"methodConfig": [{
        "name": [{"service": "org.pytorch.serve.grpc.inference.InferenceAPIsService",
                  "method": "Predictions"}],
        "retryPolicy": {"maxAttempts": 4, "initialBackoff": "0.2s", "maxBackoff": "2s",
                        "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]},
    }]})),
)


class ServingError(Exception):
    """A call to TorchServe failed; the message says why and what to do."""


class InvalidInputError(ServingError):
    """The server could not read the image (INVALID_ARGUMENT, or an error answer in a batch)."""


class ModelNotFoundError(ServingError):
    """The model or version asked for is not served."""


class AuthError(ServingError):
    """The token was missing, wrong or expired (PERMISSION_DENIED)."""


class ServerUnavailableError(ServingError):
    """Nothing answers at the address, or the server is restarting its workers."""


class DeadlineError(ServingError):
    """The call took longer than its deadline."""


class RequestTooLargeError(ServingError):
    """The request is over the size limit the client and server share."""


@dataclass(frozen=True)
class Prediction:
    """One answer of the served model."""

    digit: int
    probability: float
    probabilities: list[float]
    model_version: str

    @classmethod
    def from_json(cls, body: bytes) -> Prediction:
        answer = json.loads(body)
        if "error" in answer:
            raise InvalidInputError(answer["error"])
        return cls(answer["digit"], answer["probability"], answer["probabilities"],
                   answer.get("model_version", ""))


def read_key(key_file: Path, api: str) -> str:
    """The ``inference`` or ``management`` key from TorchServe's key file."""
    try:
        keys = json.loads(Path(key_file).read_text())
    except FileNotFoundError:
        raise AuthError(
            f"no key file at {key_file}: is TorchServe running (`digitserve serve status`)?"
        ) from None
    return keys[api]["key"]


class DigitClient:
    """Calls one TorchServe over gRPC; reuse one instance for many calls."""

    def __init__(
        self,
        inference_target: str,
        management_target: str,
        key_file: Path | None = None,
        deadline_s: float = RPC_DEADLINE_S,
        model_name: str = MODEL_NAME,
    ) -> None:
        self.key_file = Path(key_file) if key_file else None
        self.deadline_s = deadline_s
        self.model_name = model_name
        self.inference_channel = grpc.insecure_channel(inference_target, CHANNEL_OPTIONS)
        self.management_channel = grpc.insecure_channel(management_target, CHANNEL_OPTIONS)
        self.inference = inference_pb2_grpc.InferenceAPIsServiceStub(self.inference_channel)
        self.management = management_pb2_grpc.ManagementAPIsServiceStub(self.management_channel)

    @classmethod
    def for_run_dir(cls, run_dir: Path = RUN_DIR, **kwargs) -> DigitClient:
        """A client for the server started from ``run_dir`` (ports and key file from its state)."""
        state_file = Path(run_dir) / "server.json"
        if not state_file.is_file():
            raise ServerUnavailableError(
                f"no TorchServe was started from {run_dir}: run `digitserve serve start` "
                "(or notebook 03) first."
            )
        state = json.loads(state_file.read_text())
        host, ports = state.get("host", HOST), state["ports"]
        return cls(f"{host}:{ports['grpc_inference']}", f"{host}:{ports['grpc_management']}",
                   key_file=Path(state["key_file"]), **kwargs)

    def close(self) -> None:
        self.inference_channel.close()
        self.management_channel.close()

    def __enter__(self) -> DigitClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- inference API -------------------------------------------------------------------------
    def ping(self) -> str:
        """TorchServe's health, e.g. ``"Healthy"``."""
        reply = self._call(self.inference.Ping, empty_pb2.Empty(), "inference")
        return json.loads(reply.health).get("status", reply.health)

    def predict(self, image: bytes | str | Path, version: str = "", model: str | None = None
                ) -> Prediction:
        """Classify one image (bytes, or a path to an image file)."""
        data = Path(image).read_bytes() if isinstance(image, (str, Path)) else image
        if len(data) > MAX_MESSAGE_BYTES - 1024:
            raise RequestTooLargeError(
                f"the image is {len(data):,} bytes; the limit shared by client and server is "
                f"{MAX_MESSAGE_BYTES:,} bytes (config.MAX_MESSAGE_BYTES): scale it down."
            )
        request = inference_pb2.PredictionsRequest(
            model_name=model or self.model_name, model_version=version, input={"data": data}
        )
        reply = self._call(self.inference.Predictions, request, "inference",
                           model=model or self.model_name, version=version)
        return Prediction.from_json(reply.prediction)

    # -- management API ------------------------------------------------------------------------
    def describe(self, model: str | None = None, version: str = "", customized: bool = False
                 ) -> list[dict]:
        """DescribeModel: versions, workers and their status, batching settings."""
        request = management_pb2.DescribeModelRequest(
            model_name=model or self.model_name, model_version=version, customized=customized
        )
        reply = self._call(self.management.DescribeModel, request, "management",
                           model=model or self.model_name, version=version)
        return json.loads(reply.msg)

    def list_models(self, page_size: int = 100) -> list[dict]:
        """ListModels, following ``next_page_token`` to the end (a limit of 0 returns nothing)."""
        models, token = [], 0
        while True:
            request = management_pb2.ListModelsRequest(limit=page_size, next_page_token=token)
            page = json.loads(self._call(self.management.ListModels, request, "management").msg)
            models.extend(page.get("models", []))
            token = int(page.get("nextPageToken", 0) or 0)
            if not token:
                return models

    def is_ready(self, model: str | None = None, version: str = "") -> bool:
        """True when the model has at least one READY worker."""
        try:
            description = self.describe(model, version)
        except ModelNotFoundError:
            return False
        return any(worker.get("status") == "READY"
                   for entry in description for worker in entry.get("workers", []))

    # -- plumbing ------------------------------------------------------------------------------
    def metadata(self, api: str) -> tuple[tuple[str, str], ...]:
        if self.key_file is None:
            return ()
        return (("authorization", f"Bearer {read_key(self.key_file, api)}"),)

    def _call(self, method, request, api: str, model: str = "", version: str = ""):
        try:
            return method(request, timeout=self.deadline_s, metadata=self.metadata(api))
        except grpc.RpcError as err:
            raise self._translate(err, model, version) from None

    def _translate(self, err: grpc.RpcError, model: str, version: str) -> ServingError:
        code = err.code()
        details = (err.details() or "").split("\n")[0]
        target = f"{model} version {version}" if version else model
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            return InvalidInputError(details)
        if code == grpc.StatusCode.PERMISSION_DENIED:
            return AuthError(
                f"TorchServe refused the token from {self.key_file} ({details}). The key may have "
                "expired or the server restarted: re-read it, or restart with `digitserve serve "
                "start`."
            )
        if code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INTERNAL) and (
            "not found" in details.lower() or "version" in details.lower()
        ):
            return ModelNotFoundError(f"{target} is not served ({details}). {self._served()}")
        if code == grpc.StatusCode.UNAVAILABLE:
            return ServerUnavailableError(
                f"TorchServe did not answer ({details}). Is it running? `digitserve serve status`"
            )
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return DeadlineError(f"no answer within {self.deadline_s} s from TorchServe")
        if code in (grpc.StatusCode.CANCELLED, grpc.StatusCode.RESOURCE_EXHAUSTED):
            return RequestTooLargeError(
                f"{code.name}: {details or 'the message is over a size limit'}; the limit is "
                f"{MAX_MESSAGE_BYTES:,} bytes (config.MAX_MESSAGE_BYTES)."
            )
        return ServingError(f"{code.name}: {details}")

    def _served(self) -> str:
        try:
            served = [f"{m['modelName']}" for m in self.list_models()]
        except ServingError:
            return ""
        return f"Served models: {', '.join(served) or 'none'}."
