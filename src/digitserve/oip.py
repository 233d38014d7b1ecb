"""A client for the Open Inference Protocol (KServe v2 gRPC) that works with any server of it.

The protocol's gRPC service has two names in the wild, with the same messages on the wire:

- TorchServe 0.12.0 serves it as ``org.pytorch.serve.grpc.openinference.GRPCInferenceService``
  (its ``open_inference_grpc.proto`` has a package of its own, pytorch/serve #3394), beside its
  own inference API on the same port, when ``config.properties`` says
  ``ts_open_inference_protocol=true``: start it with
  ``ServerSettings(extra_properties=OIP_PROPERTIES)``.
- KServe, Triton and the protocol's standard ``grpc_predict_v2.proto`` serve
  ``inference.GRPCInferenceService``.

A stub generated from one proto calls one name only, and the other server answers UNIMPLEMENTED.
This client sends the same messages (TorchServe's generated classes: their fields are the
standard's, number for number, which ``tests/test_oip.py`` checks against KServe's own stubs) to
whichever name the server answers, found on the first call and kept. It reads outputs from the
typed ``contents`` (TorchServe) or from ``raw_output_contents`` (KServe answers so). Why no stubs
of the standard proto: protobuf keeps one global registry of message names, and KServe's stubs
already register ``inference.*`` in any process that imports kserve; a second copy would clash.

The token: TorchServe needs the *inference* key, as for its own API, so this client borrows
``DigitClient``'s channel, key handling, deadline and error messages; KServe needs none.
ModelInfer is retried like ``Predictions`` (``DigitClient._retry``, ``digitserve.channel``).

TorchServe 0.12.0 implements ServerLive, ServerReady, ModelReady, ModelMetadata (name and
versions only: no tensor metadata) and ModelInfer; ServerMetadata is not implemented.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from pathlib import Path

import grpc
import numpy as np

from digitserve.client import DigitClient, InvalidInputError, ServingError
from digitserve.config import OIP_SERVICES, RUN_DIR
from digitserve.grpc_stubs import open_inference_grpc_pb2 as pb2
from digitserve.grpc_stubs import open_inference_grpc_pb2_grpc as pb2_grpc

#: What ``ServerSettings.extra_properties`` must hold for TorchServe to answer this protocol.
OIP_PROPERTIES = {"ts_open_inference_protocol": "true"}
#: The name this client gives its one input tensor (the kit's servers read any name).
INPUT_NAME = "image"
TORCHSERVE_SERVICE, STANDARD_SERVICE = OIP_SERVICES

#: The request and response message of each RPC the client makes.
_METHODS = {
    "ServerLive": (pb2.ServerLiveRequest, pb2.ServerLiveResponse),
    "ServerReady": (pb2.ServerReadyRequest, pb2.ServerReadyResponse),
    "ServerMetadata": (pb2.ServerMetadataRequest, pb2.ServerMetadataResponse),
    "ModelReady": (pb2.ModelReadyRequest, pb2.ModelReadyResponse),
    "ModelMetadata": (pb2.ModelMetadataRequest, pb2.ModelMetadataResponse),
    "ModelInfer": (pb2.ModelInferRequest, pb2.ModelInferResponse),
}
#: Each datatype's typed ``contents`` field and its little-endian layout in raw contents.
LAYOUT = {
    "BOOL": ("bool_contents", "?"), "UINT8": ("uint_contents", "<u1"),
    "UINT16": ("uint_contents", "<u2"), "UINT32": ("uint_contents", "<u4"),
    "UINT64": ("uint64_contents", "<u8"), "INT8": ("int_contents", "<i1"),
    "INT16": ("int_contents", "<i2"), "INT32": ("int_contents", "<i4"),
    "INT64": ("int64_contents", "<i8"), "FP16": (None, "<f2"),
    "FP32": ("fp32_contents", "<f4"), "FP64": ("fp64_contents", "<f8"),
    "BYTES": ("bytes_contents", None),
}


class OipClient:
    """Calls any Open Inference Protocol server over gRPC; reuse one instance for many calls.

    ``services``: the service names to try, in order, until one answers (then only that one).
    """

    def __init__(self, client: DigitClient, services: Sequence[str] = OIP_SERVICES) -> None:
        self.client = client
        self.services = tuple(services)
        #: The service name the server answered under, once known.
        self.service: str | None = self.services[0] if len(self.services) == 1 else None
        #: TorchServe's generated stub, for calls made by hand (``stub.ModelInfer(...)``).
        self.stub = pb2_grpc.GRPCInferenceServiceStub(client.inference_channel)
        self._callables: dict[tuple[str, str], grpc.UnaryUnaryMultiCallable] = {}

    @classmethod
    def for_run_dir(cls, run_dir: Path = RUN_DIR, **kwargs) -> OipClient:
        """A client for the TorchServe of ``run_dir`` (see ``DigitClient.for_run_dir``)."""
        return cls(DigitClient.for_run_dir(run_dir, **kwargs))

    @classmethod
    def for_target(cls, target: str, key_file: Path | None = None, **kwargs) -> OipClient:
        """A client for ``host:port`` (e.g. KServe's gRPC port); ``key_file`` if it needs one."""
        return cls(DigitClient(target, target, key_file=key_file, **kwargs),
                   services=(STANDARD_SERVICE, TORCHSERVE_SERVICE))

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> OipClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def server_live(self) -> bool:
        return self._call("ServerLive", pb2.ServerLiveRequest()).live

    def server_ready(self) -> bool:
        return self._call("ServerReady", pb2.ServerReadyRequest()).ready

    def server_metadata(self) -> dict:
        """The server's name, version and protocol extensions (TorchServe: UNIMPLEMENTED)."""
        reply = self._call("ServerMetadata", pb2.ServerMetadataRequest())
        return {"name": reply.name, "version": reply.version,
                "extensions": list(reply.extensions)}

    def model_ready(self, version: str = "", model: str | None = None) -> bool:
        """True when the server can answer for the model now."""
        request = pb2.ModelReadyRequest(name=model or self.client.model_name, version=version)
        return self._call("ModelReady", request, version, model).ready

    def model_metadata(self, version: str = "", model: str | None = None) -> dict:
        """The model's name, versions, platform and tensors (TorchServe sends no tensors)."""
        request = pb2.ModelMetadataRequest(name=model or self.client.model_name, version=version)
        reply = self._call("ModelMetadata", request, version, model)
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
        "probabilities"}``; an image the server cannot read raises ``InvalidInputError``.
        """
        request = pb2.ModelInferRequest(
            model_name=model or self.client.model_name, model_version=version, id=request_id,
            inputs=[_input_tensor(image)],
        )
        reply = self._call("ModelInfer", request, version, model)
        outputs = read_outputs(reply)
        if "error" in outputs:  # a bad image that shared a batch with others (TorchServe)
            raise InvalidInputError(_text(outputs["error"][0]), "OK")
        return {
            "id": reply.id,
            "model_name": reply.model_name,
            "model_version": reply.model_version,
            "digit": int(outputs["digit"][0]),
            "probability": float(outputs["probability"][0]),
            "probabilities": [float(p) for p in outputs["probabilities"]],
        }

    def _callable(self, service: str, name: str) -> grpc.UnaryUnaryMultiCallable:
        key = (service, name)
        if key not in self._callables:
            request, response = _METHODS[name]
            self._callables[key] = self.client.inference_channel.unary_unary(
                f"/{service}/{name}", request_serializer=request.SerializeToString,
                response_deserializer=response.FromString,
            )
        return self._callables[key]

    def _call(self, name: str, request, version: str = "", model: str | None = None):
        """One RPC under the service name the server answers; the first call finds it."""
        model = model or self.client.model_name
        for service in (self.service,) if self.service else self.services:
            try:
                reply = self.client._call(self._callable(service, name), request, "inference",
                                          model, version)
            except ServingError as err:
                if err.code != grpc.StatusCode.UNIMPLEMENTED.name:
                    raise
                continue
            self.service = service
            return reply
        tried = " and ".join(self.services if not self.service else (self.service,))
        raise ServingError(
            f"{name}: the server does not answer the Open Inference Protocol's {name} under "
            f"{tried}. A TorchServe answers it only when started with "
            "ServerSettings(extra_properties=digitserve.oip.OIP_PROPERTIES) (i.e. "
            "ts_open_inference_protocol=true in config.properties), and TorchServe 0.12 has no "
            "ServerMetadata; KServe and Triton serve inference.GRPCInferenceService.",
            grpc.StatusCode.UNIMPLEMENTED.name,
        )


def read_outputs(reply: pb2.ModelInferResponse) -> dict[str, list]:
    """Every output tensor of a ModelInfer answer as a flat list, by name.

    Servers send either typed ``contents`` (TorchServe) or ``raw_output_contents`` (KServe,
    Triton: one little-endian buffer per output, in output order; BYTES elements each with a
    4-byte length before them).
    """
    outputs = {}
    for index, tensor in enumerate(reply.outputs):
        field, layout = LAYOUT.get(tensor.datatype, (None, None))
        if index < len(reply.raw_output_contents):
            raw = reply.raw_output_contents[index]
            values = (_raw_bytes(raw) if tensor.datatype == "BYTES"
                      else np.frombuffer(raw, dtype=layout).tolist() if layout else None)
        else:
            values = list(getattr(tensor.contents, field)) if field else None
        if values is None:
            raise ServingError(f"output {tensor.name!r} has datatype {tensor.datatype}, which "
                               "this client cannot read")
        outputs[tensor.name] = values
    return outputs


def _raw_bytes(raw: bytes) -> list[bytes]:
    """The elements of a raw BYTES tensor: each a 4-byte little-endian length, then its bytes."""
    elements, offset = [], 0
    while offset < len(raw):
        (size,) = struct.unpack_from("<I", raw, offset)
        elements.append(raw[offset + 4 : offset + 4 + size])
        offset += 4 + size
    return elements


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
    """One ModelInfer call to the TorchServe started from ``run_dir``; see ``OipClient.infer``."""
    with OipClient.for_run_dir(run_dir) as client:
        return client.infer(image_bytes, version=version)
