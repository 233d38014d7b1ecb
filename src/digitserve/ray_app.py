"""The Ray Serve application: DigitCNN behind the kit's own gRPC contract, on a Ray cluster.

Serve's gRPC proxy receives TorchServe's ``InferenceAPIsService`` (``Ping``, ``Predictions``,
from the kit's ``protos/inference.proto``) and TorchServe's Open Inference Protocol service
(``ModelInfer``), and hands each call to the deployment method of the same name. So
``DigitClient`` (and ``OipClient``) talk to the cluster exactly as to TorchServe: same service,
same request, same answer JSON (``preprocessing.answer``), same ``authorization: Bearer <key>``.

Replicas, batching, autoscaling:

- A *replica* is one Ray actor (one process) holding the model; Serve spreads calls over the
  replicas and restarts one that dies. Each asks for one CPU (``num_cpus``) and runs one torch
  thread, so Ray places at most one per CPU: on the kit's two one-CPU nodes, one on each node.
- ``@serve.batch``: calls that reach one replica within ``batch_wait_timeout_s`` of each other
  are answered together, up to ``max_batch_size``: one forward pass for several images, as
  TorchServe's ``batchSize``/``maxBatchDelay`` do.
- Autoscaling (not used here, where two replicas fill the two CPUs): give the deployment
  ``autoscaling_config={"min_replicas": 1, "max_replicas": N, "target_ongoing_requests": 2}``
  instead of ``num_replicas`` and Serve adds replicas while each has more than two calls in
  flight, and removes them when idle, within the CPUs the cluster has; on a cloud cluster the
  Ray autoscaler (or KubeRay) adds nodes when replicas cannot be placed.

Security: Serve's gRPC proxy has no authentication and binds every interface (``[::]``), so the
deployment checks the key itself, from the key file the kit writes readable by its user alone.
"""

from __future__ import annotations

import hmac
import json
from pathlib import Path

import grpc
from ray import serve

from digitserve.grpc_stubs import inference_pb2
from digitserve.grpc_stubs import open_inference_grpc_pb2 as oip_pb2
from digitserve.predictor import OIP_OUTPUTS, DigitPredictor

#: The servicer functions Serve's gRPC proxy registers: the services it answers on its port.
GRPC_SERVICERS = (
    "digitserve.grpc_stubs.inference_pb2_grpc.add_InferenceAPIsServiceServicer_to_server",
    "digitserve.grpc_stubs.open_inference_grpc_pb2_grpc."
    "add_GRPCInferenceServiceServicer_to_server",
)
TOKEN_REFUSED = ("Token Authorization failed. Token either incorrect, expired, or not provided "
                 "correctly")
_OIP_CONTENTS = {"INT64": "int64_contents", "FP32": "fp32_contents"}


@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=16)
class DigitDeployment:
    """One replica: DigitCNN (``predictor.DigitPredictor``) and the key it checks every call."""

    def __init__(self, weights: str, key_file: str, model_name: str,
                 max_batch_size: int = 8, batch_wait_timeout_s: float = 0.005) -> None:
        self.predictor = DigitPredictor(Path(weights), batch_sizes=(1, max_batch_size))
        self.key = json.loads(Path(key_file).read_text())["inference"]["key"]
        self.model_name = model_name
        self.predict_batch.set_max_batch_size(max_batch_size)
        self.predict_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)

    # -- the kit's inference API ---------------------------------------------------------------
    async def Ping(self, request, grpc_context) -> inference_pb2.TorchServeHealthResponse:  # noqa: N802
        if not self._authorized(grpc_context):
            return inference_pb2.TorchServeHealthResponse()
        return inference_pb2.TorchServeHealthResponse(health=json.dumps({"status": "Healthy"}))

    async def Predictions(self, request, grpc_context) -> inference_pb2.PredictionResponse:  # noqa: N802
        """One image from the input map's ``data``: the handler's answer JSON, or an error."""
        if not self._authorized(grpc_context) or not self._model_served(
                request.model_name, request.model_version, grpc_context):
            return inference_pb2.PredictionResponse()
        if "data" not in request.input:
            came = ", ".join(sorted(request.input)) or "none"
            return self._refuse(grpc_context, grpc.StatusCode.INVALID_ARGUMENT,
                                "no image in the request: expected the key 'data' (gRPC input "
                                f"map); keys received: {came}", inference_pb2.PredictionResponse)
        answer = await self.predict_batch(request.input["data"])
        if "error" in answer:
            return self._refuse(grpc_context, grpc.StatusCode.INVALID_ARGUMENT, answer["error"],
                                inference_pb2.PredictionResponse)
        return inference_pb2.PredictionResponse(prediction=json.dumps(answer).encode())

    # -- the Open Inference Protocol (TorchServe's service name) ------------------------------
    async def ModelInfer(self, request, grpc_context) -> oip_pb2.ModelInferResponse:  # noqa: N802
        if not self._authorized(grpc_context) or not self._model_served(
                request.model_name, request.model_version, grpc_context):
            return oip_pb2.ModelInferResponse()
        from digitserve import preprocessing
        from digitserve.oip import LAYOUT

        try:
            if len(request.inputs) != 1:
                raise preprocessing.InvalidInput(
                    "an Open Inference Protocol request must hold exactly one input tensor; "
                    f"it holds {len(request.inputs)}")
            tensor = request.inputs[0]
            field = LAYOUT.get(tensor.datatype, (None, None))[0]
            data = list(getattr(tensor.contents, field)) if field else []
            image = preprocessing.payload_from_tensor(tensor.datatype, list(tensor.shape), data)
        except preprocessing.InvalidInput as err:
            return self._refuse(grpc_context, grpc.StatusCode.INVALID_ARGUMENT, str(err),
                                oip_pb2.ModelInferResponse)
        answer = await self.predict_batch(image)
        if "error" in answer:
            return self._refuse(grpc_context, grpc.StatusCode.INVALID_ARGUMENT, answer["error"],
                                oip_pb2.ModelInferResponse)
        outputs = []
        for name, datatype, key in OIP_OUTPUTS:
            values = answer[key] if isinstance(answer[key], list) else [answer[key]]
            contents = oip_pb2.InferTensorContents(**{_OIP_CONTENTS[datatype]: values})
            outputs.append(oip_pb2.ModelInferResponse.InferOutputTensor(
                name=name, datatype=datatype, shape=[len(values)], contents=contents))
        return oip_pb2.ModelInferResponse(model_name=self.model_name, id=request.id,
                                          model_version=answer["model_version"], outputs=outputs)

    # -- batching --------------------------------------------------------------------------------
    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def predict_batch(self, payloads: list[bytes]) -> list[dict]:
        """Every call that arrived together, in one forward pass; a bad image fails alone."""
        return self.predictor.predict(payloads)

    # -- checks ----------------------------------------------------------------------------------
    def _authorized(self, grpc_context) -> bool:
        """``authorization: Bearer <key>`` as TorchServe wants it; PERMISSION_DENIED otherwise."""
        sent = dict(grpc_context.invocation_metadata()).get("authorization", "")
        if hmac.compare_digest(sent.encode(), f"Bearer {self.key}".encode()):
            return True
        grpc_context.set_code(grpc.StatusCode.PERMISSION_DENIED)
        grpc_context.set_details(TOKEN_REFUSED)
        return False

    def _model_served(self, model: str, version: str, grpc_context) -> bool:
        if model == self.model_name and version in ("", self.predictor.version):
            return True
        asked = f"{model} version {version}" if version else model
        grpc_context.set_code(grpc.StatusCode.NOT_FOUND)
        grpc_context.set_details(f"Model not found: {asked} (this cluster serves "
                                 f"{self.model_name} {self.predictor.version})")
        return False

    @staticmethod
    def _refuse(grpc_context, code: grpc.StatusCode, message: str, reply_type):
        grpc_context.set_code(code)
        grpc_context.set_details(message)
        return reply_type()


def build(weights: str, key_file: str, model_name: str, replicas: int | None = None,
          max_batch_size: int = 8, batch_wait_timeout_s: float = 0.005):
    """The Serve application: ``replicas`` copies of ``DigitDeployment`` (``None``: as a config
    file says, e.g. an ``autoscaling_config``)."""
    deployment = (DigitDeployment if replicas is None
                  else DigitDeployment.options(num_replicas=replicas))
    return deployment.bind(weights, key_file, model_name, max_batch_size, batch_wait_timeout_s)


def app(args: dict):
    """Serve's application builder for a config file (``import_path: digitserve.ray_app:app``,
    as in ``deploy/rayservice.yaml``): ``args`` are ``build``'s keyword arguments."""
    return build(**args)
