"""A small client for the Open Inference Protocol (KServe v2 gRPC) that TorchServe can also speak.

TorchServe serves ``inference.GRPCInferenceService`` beside its own inference API, on the same
port, when ``config.properties`` says ``ts_open_inference_protocol=true``: start it with
``ServerSettings(extra_properties=OIP_PROPERTIES)``. The same token is needed as for the
TorchServe API (the *inference* key), so this client borrows ``DigitClient``'s channel, key
handling, deadline and error messages.

Supported by TorchServe 0.12.0: ServerLive, ServerReady, ModelReady, ModelMetadata (name and
versions only: no tensor metadata) and ModelInfer. ServerMetadata is not implemented.
"""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import numpy as np

from digitserve.client import DigitClient, InvalidInputError, ServingError
from digitserve.config import RUN_DIR
from digitserve.grpc_stubs import open_inference_grpc_pb2 as pb2
from digitserve.grpc_stubs import open_inference_grpc_pb2_grpc as pb2_grpc

#: What ``ServerSettings.extra_properties`` must hold for TorchServe to answer this protocol.
OIP_PROPERTIES = {"ts_open_inference_protocol": "true"}
#: The name this client gives its one input tensor (the handler reads any name).
INPUT_NAME = "image"


class OipClient:
    """Calls TorchServe's Open Inference Protocol service; reuse one instance for many calls."""

    def __init__(self, client: DigitClient) -> None:
        self.client = client
        self.stub = pb2_grpc.GRPCInferenceServiceStub(client.inference_channel)

    @classmethod
    def for_run_dir(cls, run_dir: Path = RUN_DIR, **kwargs) -> OipClient:
        """A client for the server started from ``run_dir`` (see ``DigitClient.for_run_dir``)."""
        return cls(DigitClient.for_run_dir(run_dir, **kwargs))

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> OipClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def server_live(self) -> bool:
        return self._call(self.stub.ServerLive, pb2.ServerLiveRequest()).live

    def server_ready(self) -> bool:
        return self._call(self.stub.ServerReady, pb2.ServerReadyRequest()).ready

    def model_ready(self, version: str = "", model: str | None = None) -> bool:
        """True when the model has as many healthy workers as its minimum."""
        request = pb2.ModelReadyRequest(name=model or self.client.model_name, version=version)
        return self._call(self.stub.ModelReady, request, version).ready

    def model_metadata(self, version: str = "", model: str | None = None) -> dict:
        """The model's name, its versions and platform (TorchServe sends no tensor metadata)."""
        request = pb2.ModelMetadataRequest(name=model or self.client.model_name, version=version)
        reply = self._call(self.stub.ModelMetadata, request, version)
        return {
            "name": reply.name,
            "versions": list(reply.versions),
            "platform": reply.platform,
            "inputs": [tensor.name for tensor in reply.inputs],
            "outputs": [tensor.name for tensor in reply.outputs],
        }

    def infer(self, image: bytes | np.ndarray, version: str = "", model: str | None = None,
              request_id: str = "") -> dict:
        """ModelInfer for one image: encoded bytes (BYTES) or a uint8 pixel array (UINT8).

        Returns ``{"id", "model_name", "model_version", "digit", "probability",
        "probabilities"}``; an image the handler cannot read raises ``InvalidInputError``.
        """
        request = pb2.ModelInferRequest(
            model_name=model or self.client.model_name, model_version=version, id=request_id,
            inputs=[_input_tensor(image)],
        )
        reply = self._call(self.stub.ModelInfer, request, version, model)
        outputs = {tensor.name: tensor for tensor in reply.outputs}
        if "error" in outputs:  # a bad image that shared a batch with others
            raise InvalidInputError(_text(outputs["error"].contents.bytes_contents[0]), "OK")
        return {
            "id": reply.id,
            "model_name": reply.model_name,
            "model_version": reply.model_version,
            "digit": int(outputs["digit"].contents.int64_contents[0]),
            "probability": float(outputs["probability"].contents.fp32_contents[0]),
            "probabilities": list(outputs["probabilities"].contents.fp32_contents),
        }

    def _call(self, method, request, version: str = "", model: str | None = None):
        try:
            return self.client._call(method, request, "inference",
                                     model or self.client.model_name, version)
        except ServingError as err:
            if err.code == grpc.StatusCode.UNIMPLEMENTED.name:
                raise ServingError(
                    f"{err}: this TorchServe does not speak the Open Inference Protocol. Start "
                    "it with ServerSettings(extra_properties=digitserve.oip.OIP_PROPERTIES), "
                    "i.e. ts_open_inference_protocol=true in config.properties.", err.code,
                ) from None
            raise


def _input_tensor(image: bytes | np.ndarray) -> pb2.ModelInferRequest.InferInputTensor:
    if isinstance(image, (bytes, bytearray)):
        return pb2.ModelInferRequest.InferInputTensor(
            name=INPUT_NAME, datatype="BYTES", shape=[1],
            contents=pb2.InferTensorContents(bytes_contents=[bytes(image)]),
        )
    pixels = np.asarray(image)
    if pixels.dtype != np.uint8:
        raise InvalidInputError(f"send pixels as uint8 (0-255), not {pixels.dtype}")
    return pb2.ModelInferRequest.InferInputTensor(
        name=INPUT_NAME, datatype="UINT8", shape=list(pixels.shape),
        contents=pb2.InferTensorContents(uint_contents=pixels.ravel().tolist()),
    )


def _text(element: bytes) -> str:
    """A BYTES element TorchServe made from a JSON string: it keeps the JSON quotes."""
    text = element.decode("utf-8", errors="replace")
    try:
        return str(json.loads(text))
    except ValueError:
        return text


def predict_oip(run_dir: Path, image_bytes: bytes, version: str = "") -> dict:
    """One ModelInfer call to the server started from ``run_dir``; see ``OipClient.infer``."""
    with OipClient.for_run_dir(run_dir) as client:
        return client.infer(image_bytes, version=version)
