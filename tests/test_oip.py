"""The portable Open Inference Protocol client, the retry policy and the ports of the other
servers: everything that needs no server (unit)."""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf.descriptor import FieldDescriptor

from digitserve import channel, oip, synthetic
from digitserve.client import AsyncDigitClient, DigitClient, ServingError
from digitserve.config import OIP_SERVICES, ClusterPorts, KServePorts, Ports
from digitserve.grpc_stubs import inference_pb2
from digitserve.grpc_stubs import open_inference_grpc_pb2 as pb2

pytestmark = pytest.mark.unit


def _shape(message) -> dict:
    """A message type's wire layout: every field's number, type, label and nested layout."""
    fields = {}
    for f in message.fields:
        nested = _shape(f.message_type) if f.type == FieldDescriptor.TYPE_MESSAGE else None
        fields[f.name] = (f.number, f.type, f.is_repeated, nested)
    return fields


def test_torchserve_oip_messages_are_the_standard_messages_on_the_wire():
    """KServe's own stubs (the standard proto) and TorchServe's agree field for field, so
    TorchServe's classes can talk to a KServe or Triton server under the standard name."""
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as standard

    ours = pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    theirs = standard.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert (ours.full_name, theirs.full_name) == OIP_SERVICES
    for method in ours.methods:
        other = theirs.methods_by_name[method.name]
        assert _shape(method.input_type) == _shape(other.input_type), method.name
        assert _shape(method.output_type) == _shape(other.output_type), method.name
    assert set(oip._METHODS) <= {method.name for method in ours.methods}


def test_read_outputs_from_typed_contents_and_from_raw_contents():
    typed = pb2.ModelInferResponse(outputs=[
        pb2.ModelInferResponse.InferOutputTensor(
            name="digit", datatype="INT64", shape=[1],
            contents=pb2.InferTensorContents(int64_contents=[7])),
        pb2.ModelInferResponse.InferOutputTensor(
            name="error", datatype="BYTES", shape=[1],
            contents=pb2.InferTensorContents(bytes_contents=[b'"bad"'])),
    ])
    assert oip.read_outputs(typed) == {"digit": [7], "error": [b'"bad"']}
    probabilities = np.array([0.25, 0.75], dtype="<f4")
    raw = pb2.ModelInferResponse(
        outputs=[pb2.ModelInferResponse.InferOutputTensor(name=n, datatype=d, shape=[s])
                 for n, d, s in (("digit", "INT64", 1), ("probabilities", "FP32", 2),
                                 ("text", "BYTES", 2))],
        raw_output_contents=[np.array([3], dtype="<i8").tobytes(), probabilities.tobytes(),
                             struct.pack("<I", 2) + b"ab" + struct.pack("<I", 0)],
    )
    assert oip.read_outputs(raw) == {"digit": [3], "probabilities": [0.25, 0.75],
                                     "text": [b"ab", b""]}


def test_an_unknown_datatype_is_a_clear_error():
    reply = pb2.ModelInferResponse(outputs=[pb2.ModelInferResponse.InferOutputTensor(
        name="x", datatype="COMPLEX", shape=[1])])
    with pytest.raises(oip.ServingError, match="COMPLEX"):
        oip.read_outputs(reply)


def test_retry_policy_names_real_idempotent_methods_only():
    config = channel.SERVICE_CONFIG["methodConfig"]
    assert len(config) == 1
    names = {(entry["service"], entry["method"]) for entry in config[0]["name"]}
    inference = inference_pb2.DESCRIPTOR.services_by_name["InferenceAPIsService"]
    assert (inference.full_name, "Predictions") in names
    assert {(service, "ModelInfer") for service in OIP_SERVICES} <= names
    assert {method for _, method in names} == {"Predictions", "ModelInfer"}
    policy = config[0]["retryPolicy"]
    # Only UNAVAILABLE: a request that kills its worker (RESOURCE_EXHAUSTED from TorchServe,
    # INTERNAL from Ray Serve) is sent once more by the client, never by gRPC's policy.
    assert policy["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert 2 <= policy["maxAttempts"] <= 5


@pytest.mark.parametrize("offset", [0, 100, 1000, 3000, 4000, 12300])
def test_the_other_servers_ports_never_meet_torchserve_or_another_seat(offset):
    """Ports end in 00-69: no seat's TorchServe ports (ending 70-82) and no other seat's block
    (offsets are multiples of 100) can be among them."""
    block = 10_000 + offset
    kserve, ray = KServePorts.at(block), ClusterPorts.at(block)
    ours = [*dataclasses.astuple(kserve),
            *(port for name, port in dataclasses.asdict(ray).items()
              if not name.endswith("_workers"))]
    workers = [start + i for start in (ray.head_workers, ray.node_workers)
               for i in range(ray.WORKER_PORTS)]
    everything = ours + workers
    assert len(set(everything)) == len(everything), "two roles share a port"
    assert all(block <= port < block + 70 for port in everything)
    torchserve_ends = {port % 100 for port in dataclasses.astuple(Ports())}
    assert not torchserve_ends & {port % 100 for port in everything}


# -- the replica-death retry, against a small in-process gRPC server ---------------------------
INFERENCE_SERVICE = inference_pb2.DESCRIPTOR.services_by_name["InferenceAPIsService"].full_name


class _Flaky:
    """Answers each method with a failure first (as Ray Serve's proxy sends it), then OK."""

    def __init__(self, details: str) -> None:
        self.details, self.calls = details, []

    def handler(self, method: str, reply: bytes):
        def answer(request: bytes, context) -> bytes:
            self.calls.append(method)
            if self.calls.count(method) == 1:
                context.set_code(grpc.StatusCode.INTERNAL)
                context.set_details(self.details)
                return b""  # headers and an empty message: gRPC's own policy cannot retry it
            return reply
        return grpc.unary_unary_rpc_method_handler(answer)


ANSWER = inference_pb2.PredictionResponse(prediction=json.dumps(
    {"digit": 1, "probability": 0.9, "probabilities": [0.0, 0.9] + [0.0125] * 8,
     "model_version": "1.0"}).encode()).SerializeToString()


@pytest.fixture
def flaky_server(request):
    from concurrent.futures import ThreadPoolExecutor

    flaky = _Flaky(request.param)
    server = grpc.server(ThreadPoolExecutor(4))
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        INFERENCE_SERVICE, {"Predictions": flaky.handler("Predictions", ANSWER),
                            "Ping": flaky.handler("Ping", b"")})])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield flaky, f"127.0.0.1:{port}"
    server.stop(0)


PNG = synthetic.png(np.pad(np.full((20, 4), 255, np.uint8), ((4, 4), (12, 12))))


@pytest.mark.parametrize("flaky_server", ["The actor died unexpectedly before finishing this "
                                          "task."], indirect=True)
def test_a_prediction_whose_replica_died_is_sent_once_more(flaky_server):
    flaky, target = flaky_server
    with DigitClient(target, target) as digits:
        assert digits.predict(PNG).digit == 1
        assert flaky.calls == ["Predictions", "Predictions"]
        with pytest.raises(ServingError):  # not a prediction: never sent again
            digits.ping()
    assert flaky.calls.count("Ping") == 1


@pytest.mark.parametrize("flaky_server", ["a bug in the handler"], indirect=True)
def test_any_other_internal_error_is_not_retried(flaky_server):
    flaky, target = flaky_server
    with DigitClient(target, target) as digits, pytest.raises(ServingError) as raised:
        digits.predict(PNG)
    assert raised.value.code == "INTERNAL" and "a bug in the handler" in str(raised.value)
    assert flaky.calls == ["Predictions"]


@pytest.mark.parametrize("flaky_server", ["The actor died unexpectedly."], indirect=True)
def test_the_async_client_sends_a_replica_death_once_more_too(flaky_server):
    import asyncio

    flaky, target = flaky_server

    async def call() -> int:
        with DigitClient(target, target) as digits:
            fast = AsyncDigitClient(digits)
            try:
                return (await fast.predict(PNG)).digit
            finally:
                await fast.close()

    assert asyncio.run(call()) == 1
    assert flaky.calls == ["Predictions", "Predictions"]


# -- the cluster's command lines ----------------------------------------------------------------
def test_every_ray_port_is_explicit_and_distinct_per_node():
    import ipaddress

    from digitserve import cluster

    settings = cluster.ClusterSettings(ports=ClusterPorts.at(20_000))
    head, node = cluster.node_commands(settings)

    def ports(command: list[str]) -> dict[str, int]:
        return {arg.split("=")[0]: int(arg.split("=")[1]) for arg in command
                if arg.startswith("--") and "port" in arg and "=" in arg}

    head_ports, node_ports = ports(head), ports(node)
    for flag in ("--node-manager-port", "--object-manager-port", "--runtime-env-agent-port",
                 "--dashboard-agent-grpc-port", "--dashboard-agent-listen-port",
                 "--metrics-export-port", "--min-worker-port", "--max-worker-port"):
        assert flag in head_ports and flag in node_ports, flag
    assert {"--port", "--ray-client-server-port", "--dashboard-port"} <= set(head_ports)
    assert not set(head_ports.values()) & set(node_ports.values())
    assert set(head_ports.values()) | set(node_ports.values()) <= set(cluster.all_ports(
        settings.ports))
    for command in (head, node):
        assert "--num-cpus=1" in command and f"--temp-dir={settings.temp_dir}" in command
        address = next(arg.split("=")[1] for arg in command if arg.startswith("--node-ip"))
        assert ipaddress.ip_address(address).is_loopback and address != "127.0.0.1"
    assert "--include-dashboard=false" in head
    assert f"--address={cluster.HEAD_IP}:{settings.ports.gcs}" in node
    environment = cluster.environment(settings)
    assert environment["RAY_USAGE_STATS_ENABLED"] == "0"
    assert environment[cluster.MARKER] == str(settings.temp_dir)
    assert str(Path(cluster.__file__).parents[1]) in environment["PYTHONPATH"].split(os.pathsep)
