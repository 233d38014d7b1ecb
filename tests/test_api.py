"""Every RPC of TorchServe 0.12.0's gRPC APIs against a real server, and the clients around them.

Three services: the inference API (Ping, Predictions, StreamPredictions, StreamPredictions2),
the management API (DescribeModel, ListModels, RegisterModel, ScaleWorker, SetDefault,
UnregisterModel) and the Open Inference Protocol (KServe v2). ``RPC_TESTS`` at the bottom names
the test that calls each RPC, and a test checks that it names every RPC of the generated stubs.

Where TorchServe behaves in a surprising way, the test pins what it does (StreamPredictions2 on
a stateless model, ListModels with limit 0, unregistering the default version), so that an
upgrade that changes it fails here first.

Besides the session's ``server``, this module starts two servers of its own: one with the model
API on (register/unregister, from its own model store) and one with the Open Inference Protocol
on and batching, so that a bad OIP request can share a batch with good ones.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from digitserve import archive, client, evaluate, oip, preprocessing, synthetic
from digitserve.config import ARCHIVE_NAME, HOST, MODEL_NAME, MODEL_VERSION
from digitserve.grpc_stubs import (
    inference_pb2,
    management_pb2,
    open_inference_grpc_pb2,
    open_inference_grpc_pb2_grpc,
)
from digitserve.server import ModelSpec, ServerSettings, TorchServe, start_on_free_ports

pytestmark = pytest.mark.integration

N_IMAGES = 40
V2 = "2.0"
V2_ARCHIVE = "digit-model-v2"
#: A second model name, so that ListModels (one entry per model name) has pages to turn.
OTHER_MODEL = "digitmodel-b"
OTHER_ARCHIVE = "digit-model-b"
#: Management calls that start a worker (register, scale up) wait for it: seconds, not 10 s.
WORKER_START_DEADLINE_S = 180.0
#: Other calls wait behind up to a few dozen predictions of a single worker.
CALL_DEADLINE_S = 60.0


# -- fixtures -------------------------------------------------------------------------------------
def start_server(run_dir: Path, store: Path, recorder, **settings) -> TorchServe:
    """Start a TorchServe of this module's own, recorded so the session checks it is stopped."""
    # Free ports, chosen again if another process takes one first; a failed start has already
    # stopped what it started.
    server = start_on_free_ports(ServerSettings(run_dir=run_dir, model_store=store, **settings))
    recorder(server.process.pid)
    return server


@pytest.fixture(scope="module")
def api_store(model_store: Path, trained_weights: Path, tmp_path_factory) -> Path:
    """A model store with 1.0, a 2.0 of the same weights, and the same model under another name."""
    store = tmp_path_factory.mktemp("api_store")
    shutil.copy(model_store / f"{ARCHIVE_NAME}.mar", store)
    archive.build_archive(trained_weights, version=V2, archive_name=V2_ARCHIVE, model_store=store)
    archive.build_archive(trained_weights, archive_name=OTHER_ARCHIVE, model_name=OTHER_MODEL,
                          model_store=store)
    return store


@pytest.fixture(scope="module")
def api_server(api_store: Path, tmp_path_factory, server_group_recorder):
    """TorchServe with the model API on (register/unregister from ``api_store`` only)."""
    ts = start_server(tmp_path_factory.mktemp("run_api"), api_store, server_group_recorder,
                      enable_model_api=True)
    yield ts
    ts.stop()


@pytest.fixture(scope="module")
def api_client(api_server):
    with client.DigitClient.for_run_dir(api_server.run_dir,
                                        deadline_s=WORKER_START_DEADLINE_S) as c:
        yield c


@pytest.fixture(scope="module")
def batching_oip_server(model_store: Path, tmp_path_factory, server_group_recorder):
    """TorchServe speaking the Open Inference Protocol too, batching up to 8 requests."""
    ts = start_server(tmp_path_factory.mktemp("run_oip"), model_store, server_group_recorder,
                      models=(ModelSpec(batch_size=8, max_batch_delay_ms=50),),
                      extra_properties=oip.OIP_PROPERTIES)
    yield ts
    ts.stop()


@pytest.fixture(scope="module")
def oip_client(batching_oip_server):
    with oip.OipClient.for_run_dir(batching_oip_server.run_dir, deadline_s=CALL_DEADLINE_S) as c:
        yield c


@pytest.fixture(scope="module")
def digit_client(server):
    """A client of the session's server, with a deadline that allows for a busy CPU."""
    with client.DigitClient.for_run_dir(server.run_dir, deadline_s=CALL_DEADLINE_S) as c:
        yield c


@pytest.fixture(scope="module")
def pngs(mnist_test) -> list[bytes]:
    return [synthetic.png(image) for image in mnist_test[0][:N_IMAGES].numpy()]


@pytest.fixture(scope="module")
def in_process(mnist_test, trained_weights) -> torch.Tensor:
    """Probabilities of the same weights computed in this process: (N_IMAGES, 10)."""
    model = evaluate.load_model(trained_weights)
    digits = preprocessing.normalize_digits(mnist_test[0][:N_IMAGES])
    return evaluate.predict_logits(model, digits).softmax(dim=1)


def handler_message(payload: object) -> str:
    """What the handler's preprocessing says about a bad payload, computed in-process."""
    with pytest.raises(preprocessing.InvalidInput) as raised:
        preprocessing.digit_from_payload(payload)
    return str(raised.value)


def served_versions(c: client.DigitClient, model: str = MODEL_NAME) -> list[str]:
    return sorted(entry["modelVersion"] for entry in c.describe(model, version="all"))


def worker_statuses(c: client.DigitClient, version: str = "") -> list[str]:
    (description,) = c.describe(version=version)
    return [worker["status"] for worker in description["workers"]]


def list_page(c: client.DigitClient, limit: int, token: int = 0) -> dict:
    """One raw ListModels page: ``{"models": [...], "nextPageToken": "..."}`` (token optional)."""
    request = management_pb2.ListModelsRequest(limit=limit, next_page_token=token)
    return json.loads(c.management.ListModels(request, timeout=10,
                                              metadata=c.metadata("management")).msg)


# -- the inference API ----------------------------------------------------------------------------
def test_ping_is_healthy(digit_client):
    assert digit_client.ping() == "Healthy"


def test_stream_predictions_sends_one_answer_the_unary_one(digit_client, pngs, in_process):
    """One message, the call ends, and the worker lives on (see "Streaming" in handler.py: the
    handler marks it final with ``ts_stream_next: false``, without which TorchServe 0.12.0
    kills the worker here)."""
    (before,) = digit_client.describe()
    for index in range(3):
        (answer,) = list(digit_client.stream(pngs[index]))
        assert answer == asdict(digit_client.predict(pngs[index]))
        assert answer["digit"] == int(in_process[index].argmax())
    (after,) = digit_client.describe()
    assert [w["pid"] for w in after["workers"]] == [w["pid"] for w in before["workers"]]


def test_rest_answers_are_not_marked_as_streams(server, pngs, in_process):
    """The same handler answers REST: a plain JSON body, without the gRPC-only stream header."""
    key = json.loads(server.key_file.read_text())["inference"]["key"]
    request = urllib.request.Request(
        f"http://{HOST}:{server.settings.ports.http_inference}/predictions/{MODEL_NAME}",
        data=pngs[1], method="POST",
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/octet-stream"})
    with urllib.request.urlopen(request, timeout=CALL_DEADLINE_S) as response:
        assert response.headers.get("ts_stream_next") is None
        assert json.loads(response.read())["digit"] == int(in_process[1].argmax())


def test_stream_predictions2_is_refused_for_a_stateless_model(digit_client, pngs, in_process):
    """StreamPredictions2 is for stateful (sequence-batching) models; DigitCNN is stateless.

    - Without a ``sequence_id`` each request gets, in band, a response whose ``status`` is
      INTERNAL "Parameter sequenceId is required." and no prediction; the stream stays open.
    - With a ``sequence_id`` TorchServe queues the request, then fails looking up the
      sequence's job group (a NullPointerException: stateless models have none) and ends the
      call with UNKNOWN and no details, before the worker's answer arrives.
    """
    metadata = digit_client.metadata("inference")

    def requests(sequence_id: str):
        for data in pngs[:2]:
            yield inference_pb2.PredictionsRequest(model_name=MODEL_NAME, input={"data": data},
                                                   sequence_id=sequence_id)

    replies = list(digit_client.inference.StreamPredictions2(requests(""), timeout=30,
                                                             metadata=metadata))
    assert len(replies) == 2
    for reply in replies:
        assert reply.prediction == b""
        assert client._status_name(reply.status.code) == "INTERNAL"
        assert reply.status.message == "Parameter sequenceId is required."

    received = []
    with pytest.raises(grpc.RpcError) as raised:
        for reply in digit_client.inference.StreamPredictions2(requests("seq-1"), timeout=30,
                                                               metadata=metadata):
            received.append(reply)
    assert raised.value.code() == grpc.StatusCode.UNKNOWN and received == []

    # The kit's client raises both as ServingError, and the server keeps serving.
    with pytest.raises(client.ServingError, match="sequenceId is required"):
        list(digit_client.stream_bidirectional(pngs[:2], sequence_id=""))
    with pytest.raises(client.ServingError) as raised:
        list(digit_client.stream_bidirectional(pngs[:2], sequence_id="seq-2"))
    assert raised.value.code == "UNKNOWN"
    assert digit_client.predict(pngs[0]).digit == int(in_process[0].argmax())


def test_async_predict_many_matches_the_threaded_client(server, digit_client, pngs, in_process):
    payloads = [*pngs[:20], b"not an image", *pngs[20:30]]

    async def predict_all():
        aio = client.AsyncDigitClient.for_run_dir(server.run_dir, deadline_s=CALL_DEADLINE_S)
        try:
            return await aio.predict_many(payloads, concurrency=8, progress=False)
        finally:
            await aio.close()

    results = asyncio.run(predict_all())
    threaded = digit_client.predict_many(payloads, concurrency=8, progress=False)
    assert len(results) == len(payloads)
    assert isinstance(results[20], client.InvalidInputError)
    assert str(results[20]) == handler_message(b"not an image")
    answers = results[:20] + results[21:]
    expected = in_process[:30].argmax(dim=1).tolist()
    assert [a.digit for a in answers] == expected
    assert [a.digit for a in threaded[:20] + threaded[21:]] == expected
    assert isinstance(threaded[20], client.InvalidInputError)


# -- the management API ---------------------------------------------------------------------------
def test_describe_customized_adds_what_the_handler_says(digit_client):
    (plain,) = digit_client.describe()
    assert "customizedMetadata" not in plain
    (described,) = digit_client.describe(customized=True)
    meta = described["customizedMetadata"]
    assert meta["model_version"] == MODEL_VERSION
    assert meta["open_inference_protocol"]["outputs"]["probabilities"] == "FP32 [10]"
    assert meta["preprocessing"]["image_size"] == preprocessing.IMAGE_SIZE
    assert {k: v for k, v in described.items() if k != "customizedMetadata"}.keys() == plain.keys()
    # With version "all" TorchServe ignores customized (the handler is not asked).
    assert all("customizedMetadata" not in d
               for d in digit_client.describe(version="all", customized=True))


def test_list_models_pages_through_every_model_name(api_client):
    api_client.register(f"{OTHER_ARCHIVE}.mar")
    try:
        # One page per model name with limit=1; the token is the index of the next name.
        # When the names fill the last page exactly, it still carries a token, and the page
        # after it is empty and carries none.
        assert list_page(api_client, 1) == {
            "nextPageToken": "1", "models": [{"modelName": MODEL_NAME,
                                              "modelUrl": f"{ARCHIVE_NAME}.mar"}]}
        assert list_page(api_client, 1, 1) == {
            "nextPageToken": "2", "models": [{"modelName": OTHER_MODEL,
                                              "modelUrl": f"{OTHER_ARCHIVE}.mar"}]}
        assert list_page(api_client, 1, 2) == {"models": []}
        # limit 0 returns no models and a token pointing where it started: a client that
        # follows it would loop for ever; the kit's client stops at a token of 0.
        assert list_page(api_client, 0) == {"nextPageToken": "0", "models": []}
        assert list_page(api_client, 0, 1) == {"nextPageToken": "1", "models": []}
        assert api_client.list_models(page_size=0) == []
        # A negative limit (or one over 100) means 100.
        assert [m["modelName"] for m in list_page(api_client, -1)["models"]] == [
            MODEL_NAME, OTHER_MODEL]
        assert api_client.list_models(page_size=1) == api_client.list_models() == (
            list_page(api_client, 100)["models"])
    finally:
        api_client.unregister(model=OTHER_MODEL)
    assert [m["modelName"] for m in api_client.list_models()] == [MODEL_NAME]


def test_scale_worker_up_and_down(api_client, pngs):
    assert worker_statuses(api_client) == ["READY"]
    assert "scaled to 2" in api_client.scale(2)  # synchronous: returns once the worker is up
    assert worker_statuses(api_client) == ["READY", "READY"]
    (description,) = api_client.describe()
    assert (description["minWorkers"], description["maxWorkers"]) == (2, 2)
    answers = api_client.predict_many(pngs[:8], concurrency=4, progress=False)
    assert all(isinstance(answer, client.Prediction) for answer in answers)
    assert "scaled to 1" in api_client.scale(1)
    deadline = time.monotonic() + 30  # the worker scaled down may still show as stopping
    while len(worker_statuses(api_client)) > 1 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert worker_statuses(api_client) == ["READY"]


def test_registering_from_outside_the_model_store_is_refused(api_client, api_store, tmp_path):
    outside = tmp_path / "elsewhere.mar"
    shutil.copy(api_store / f"{V2_ARCHIVE}.mar", outside)  # a valid archive, in the wrong place
    for url in (f"file://{outside}", "https://example.com/digit-model.mar"):
        with pytest.raises(client.ServingError) as raised:
            api_client.register(url)
        assert raised.value.code == "NOT_FOUND"
        assert "does not match any allowed URL" in str(raised.value)
    # A path is refused by the client: TorchServe itself would load any directory given by
    # its absolute path as an unpacked model (test_adversarial_server pins it).
    with pytest.raises(client.ServingError, match="takes the file name of a .mar") as raised:
        api_client.register(str(outside))
    assert raised.value.code == ""
    assert served_versions(api_client) == [MODEL_VERSION]


def test_model_api_is_off_unless_asked(digit_client):
    for call in (lambda: digit_client.register(f"{ARCHIVE_NAME}.mar"),
                 lambda: digit_client.unregister(MODEL_VERSION)):
        with pytest.raises(client.ServingError, match="enable_model_api=True") as raised:
            call()
        assert raised.value.code == "PERMISSION_DENIED"
    assert served_versions(digit_client) == [MODEL_VERSION]


def test_two_versions_side_by_side_then_a_new_default(api_client, pngs, in_process):
    """Register 2.0 beside 1.0, ask each by name, make 2.0 the default, retire 1.0."""
    status = api_client.register(f"{V2_ARCHIVE}.mar")
    assert status == f'Model "{MODEL_NAME}" Version: {V2} registered with 1 initial workers'
    assert served_versions(api_client) == [MODEL_VERSION, V2]
    expected = in_process[:5].argmax(dim=1).tolist()
    for version in (MODEL_VERSION, V2):
        answers = [api_client.predict(png, version=version) for png in pngs[:5]]
        assert {a.model_version for a in answers} == {version}
        assert [a.digit for a in answers] == expected
    assert api_client.predict(pngs[0]).model_version == MODEL_VERSION  # still the default

    # TorchServe refuses to unregister the default version while others exist, but the
    # exception escapes its handler: the call ends UNKNOWN with no details (the log says why).
    with pytest.raises(client.ServingError) as raised:
        api_client.unregister(MODEL_VERSION)
    assert raised.value.code == "UNKNOWN"
    assert served_versions(api_client) == [MODEL_VERSION, V2]

    assert api_client.set_default(V2) == (
        f'Default version successfully updated for model "{MODEL_NAME}" to "{V2}"')
    assert api_client.predict(pngs[0]).model_version == V2
    # ListModels shows each model's default version, by its archive.
    assert api_client.list_models() == [{"modelName": MODEL_NAME,
                                         "modelUrl": f"{V2_ARCHIVE}.mar"}]
    assert api_client.unregister(MODEL_VERSION) == f'Model "{MODEL_NAME}" unregistered'
    assert served_versions(api_client) == [V2]
    with pytest.raises(client.ModelNotFoundError, match=MODEL_VERSION):
        api_client.predict(pngs[0], version=MODEL_VERSION)
    assert api_client.predict(pngs[0]).model_version == V2

    # Back to how the module found it: 1.0 alone, the default.
    api_client.register(f"{ARCHIVE_NAME}.mar")
    api_client.set_default(MODEL_VERSION)
    api_client.unregister(V2)
    assert served_versions(api_client) == [MODEL_VERSION]


# -- the command line -----------------------------------------------------------------------------
def cli(run_dir: Path, *args: str) -> subprocess.CompletedProcess:
    """Run the ``digitserve`` console script of this environment against one server."""
    script = Path(sys.executable).with_name("digitserve")
    env = {**os.environ, "DIGITSERVE_RUN_DIR": str(run_dir)}
    return subprocess.run([str(script), *args], env=env, capture_output=True, text=True,
                          timeout=300, check=False)


def cli_json(run_dir: Path, *args: str):
    done = cli(run_dir, *args, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_cli_management_commands_print_json(api_server, api_client, pngs, tmp_path):
    run_dir = api_server.run_dir
    image = tmp_path / "digit.png"
    image.write_bytes(pngs[0])
    assert cli_json(run_dir, "models") == [{"modelName": MODEL_NAME,
                                            "modelUrl": f"{ARCHIVE_NAME}.mar"}]
    (described,) = cli_json(run_dir, "describe", "--customized")
    assert described["customizedMetadata"]["model_version"] == MODEL_VERSION

    # The CLI gives every call the kit's 10 s deadline, while RegisterModel waits for the new
    # worker to start (13-17 s on a busy 2-core machine): it may report DEADLINE_EXCEEDED
    # although TorchServe goes on and registers the version. Either way 2.0 ends up served.
    registered = cli(run_dir, "register", f"{V2_ARCHIVE}.mar", "--json")
    if registered.returncode == 0:
        assert "registered with 1 initial workers" in json.loads(registered.stdout)
    else:
        assert "within the call's deadline of" in registered.stderr, registered.stderr
    deadline = time.monotonic() + WORKER_START_DEADLINE_S
    while not api_client.is_ready(version=V2) and time.monotonic() < deadline:
        time.sleep(1)
    try:
        versions = cli_json(run_dir, "describe", "--version", "all")
        assert sorted(d["modelVersion"] for d in versions) == [MODEL_VERSION, V2]
        assert "2.0" in cli_json(run_dir, "set-default", V2)
        assert json.loads(cli(run_dir, "predict", str(image)).stdout)["model_version"] == V2
        answer = cli_json(run_dir, "predict", str(image), "--version", MODEL_VERSION)
        assert answer["model_version"] == MODEL_VERSION
        (streamed,) = cli_json(run_dir, "stream", str(image))
        assert streamed["model_version"] == V2
        assert "scaled to 1" in cli_json(run_dir, "scale", "1", "--version", V2)
        assert "Default version" in cli_json(run_dir, "set-default", MODEL_VERSION)
        assert cli_json(run_dir, "unregister", "--version", V2) == (
            f'Model "{MODEL_NAME}" unregistered')
    finally:
        if V2 in served_versions(api_client):
            api_client.set_default(MODEL_VERSION)
            api_client.unregister(V2)
    failed = cli(run_dir, "unregister", "--version", "9.9", "--json")
    assert failed.returncode == 1 and "9.9" in failed.stderr and failed.stdout == ""
    assert served_versions(api_client) == [MODEL_VERSION]


# -- the Open Inference Protocol ------------------------------------------------------------------
def test_oip_health_and_metadata(oip_client):
    assert oip_client.server_live() is True
    assert oip_client.server_ready() is True
    assert oip_client.model_ready() is True
    assert oip_client.model_ready(version=MODEL_VERSION) is True
    with pytest.raises(client.ModelNotFoundError) as raised:
        oip_client.model_ready(model="nosuchmodel")
    assert raised.value.code == "NOT_FOUND"
    # TorchServe fills in the name and versions only: no platform, no tensor metadata.
    assert oip_client.model_metadata() == {"name": MODEL_NAME, "versions": [MODEL_VERSION],
                                           "platform": "", "inputs": [], "outputs": []}
    # ServerMetadata is in the protocol but TorchServe 0.12.0 does not implement it.
    c = oip_client.client
    with pytest.raises(grpc.RpcError) as raised:
        oip_client.stub.ServerMetadata(open_inference_grpc_pb2.ServerMetadataRequest(),
                                       timeout=10, metadata=c.metadata("inference"))
    assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_predict_oip_answers_what_the_torchserve_api_answers_on_the_same_port(
    batching_oip_server, oip_client, pngs, in_process
):
    """Both protocols are served on the one inference port at once; same model, same answers."""
    with client.DigitClient.for_run_dir(batching_oip_server.run_dir,
                                        deadline_s=CALL_DEADLINE_S) as regular:
        for index in range(5):
            answer = oip.predict_oip(batching_oip_server.run_dir, pngs[index])
            reference = regular.predict(pngs[index])
            assert answer["digit"] == reference.digit == int(in_process[index].argmax())
            assert answer["probabilities"] == pytest.approx(reference.probabilities, abs=1e-6)
            assert answer["probability"] == pytest.approx(reference.probability, abs=1e-6)
            assert answer["model_name"] == MODEL_NAME
            assert answer["model_version"] == MODEL_VERSION
            assert answer["id"]  # TorchServe's request id when the request names none
    assert oip_client.infer(pngs[0], request_id="my-id-7")["id"] == "my-id-7"


def test_oip_pixel_tensors(oip_client, mnist_test, pngs):
    pixels = mnist_test[0][0].numpy()
    expected = oip_client.infer(pngs[0])["digit"]
    assert oip_client.infer(pixels)["digit"] == expected  # UINT8 [28, 28]
    assert oip_client.infer(pixels[None])["digit"] == expected  # UINT8 [1, 28, 28]
    Tensor = open_inference_grpc_pb2.ModelInferRequest.InferInputTensor  # noqa: N806
    Contents = open_inference_grpc_pb2.InferTensorContents  # noqa: N806
    c = oip_client.client
    for tensor in (
        Tensor(name="x", datatype="INT32", shape=[28, 28],
               contents=Contents(int_contents=pixels.ravel().tolist())),
        Tensor(name="x", datatype="FP32", shape=[1, 1, 28, 28],
               contents=Contents(fp32_contents=(pixels.ravel() / 255.0).tolist())),
    ):
        request = open_inference_grpc_pb2.ModelInferRequest(model_name=MODEL_NAME,
                                                            inputs=[tensor])
        reply = oip_client.stub.ModelInfer(request, timeout=60,
                                           metadata=c.metadata("inference"))
        assert [o.name for o in reply.outputs] == ["digit", "probability", "probabilities"]
        assert [list(o.shape) for o in reply.outputs] == [[1], [1], [10]]
        assert [o.datatype for o in reply.outputs] == ["INT64", "FP32", "FP32"]
        assert reply.outputs[0].contents.int64_contents[0] == expected
    with pytest.raises(client.InvalidInputError, match=r"shape \[3, 28, 28\]"):
        oip_client.infer(np.stack([pixels] * 3))


def test_oip_bad_input_alone_and_inside_a_batch(batching_oip_server, oip_client, pngs, in_process):
    """Alone, a bad image is INVALID_ARGUMENT; batched with good ones it gets an ``error``
    output (TorchServe makes a ModelInferResponse of every answer in a batch). The client raises
    InvalidInputError for both, with the handler's message."""
    bad = b"\x00\x01 not an image"
    with pytest.raises(client.InvalidInputError) as raised:
        oip_client.infer(bad)
    assert raised.value.code == "INVALID_ARGUMENT"
    assert str(raised.value).startswith(handler_message(bad))

    payloads = [bad if i % 4 == 3 else pngs[i] for i in range(12)]
    seen_in_batch = False
    with oip.OipClient.for_run_dir(batching_oip_server.run_dir, deadline_s=CALL_DEADLINE_S) as c:
        for _ in range(3):
            start = threading.Barrier(len(payloads))

            def call(payload: bytes, start=start):
                start.wait()
                try:
                    return c.infer(payload)
                except client.ServingError as err:
                    return err

            with ThreadPoolExecutor(len(payloads)) as pool:
                results = list(pool.map(call, payloads))
            for index, (payload, result) in enumerate(zip(payloads, results, strict=True)):
                if payload is bad:
                    assert isinstance(result, client.InvalidInputError), result
                    assert str(result).startswith(handler_message(bad))
                    seen_in_batch |= result.code == "OK"
                else:
                    assert result["digit"] == int(in_process[index].argmax()), result
            if seen_in_batch:
                break
    assert seen_in_batch, "no bad OIP request was ever batched with others"


def test_oip_requests_the_handler_refuses(mnist_test):
    """In-process: what the handler accepts from an OIP body, and what each refusal says."""
    from digitserve import handler

    pixels = mnist_test[0][0].numpy()

    def body(*inputs: dict) -> dict:
        return {"id": "", "model_name": MODEL_NAME, "inputs": list(inputs)}

    image = {"name": "x", "datatype": "BYTES", "shape": [1],
             "data": [base64.b64encode(synthetic.png(pixels)).decode()]}
    assert handler.is_oip({"body": body(image)}) and not handler.is_oip({"body": b"..."})
    assert handler.oip_payload(body(image)) == synthetic.png(pixels)
    rows = {"name": "x", "datatype": "UINT8", "shape": [1, 28, 28], "data": pixels.ravel().tolist()}
    assert handler.oip_payload(body(rows)) == pixels.tolist()
    refused = {
        "exactly one input tensor": body(image, image),
        "send one image per request": body({**image, "shape": [2], "data": image["data"] * 2}),
        "not base64": body({**image, "data": ["not base64!"]}),
        "'BOOL' is not supported": body({**rows, "datatype": "BOOL"}),
        "as many values as the shape says": body({**rows, "shape": [28, 27]}),
    }
    for message, request in refused.items():
        with pytest.raises(preprocessing.InvalidInput, match=message):
            handler.oip_payload(request)


def test_oip_needs_the_inference_token(batching_oip_server, pngs):
    target = f"{HOST}:{batching_oip_server.settings.ports.grpc_inference}"
    keys = json.loads(batching_oip_server.key_file.read_text())
    request = open_inference_grpc_pb2.ModelInferRequest(
        model_name=MODEL_NAME, inputs=[oip._input_tensor(pngs[0])])
    with grpc.insecure_channel(target) as channel:
        stub = open_inference_grpc_pb2_grpc.GRPCInferenceServiceStub(channel)
        for metadata in ((), (("authorization", f"Bearer {keys['management']['key']}"),)):
            with pytest.raises(grpc.RpcError) as raised:
                stub.ModelInfer(request, timeout=30, metadata=metadata)
            assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.RpcError) as raised:
            stub.ServerLive(open_inference_grpc_pb2.ServerLiveRequest(), timeout=10)
        assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
        good = (("authorization", f"Bearer {keys['inference']['key']}"),)
        assert stub.ModelInfer(request, timeout=60, metadata=good).outputs


def test_oip_is_off_unless_asked(server, pngs):
    with pytest.raises(client.ServingError, match="OIP_PROPERTIES") as raised:
        oip.predict_oip(server.run_dir, pngs[0])
    assert raised.value.code == "UNIMPLEMENTED"


# -- every RPC is exercised -----------------------------------------------------------------------
RPC_TESTS = {
    "org.pytorch.serve.grpc.inference.InferenceAPIsService": {
        "Ping": "test_ping_is_healthy",
        "Predictions": "test_two_versions_side_by_side_then_a_new_default",
        "StreamPredictions": "test_stream_predictions_sends_one_answer_the_unary_one",
        "StreamPredictions2": "test_stream_predictions2_is_refused_for_a_stateless_model",
    },
    "org.pytorch.serve.grpc.management.ManagementAPIsService": {
        "DescribeModel": "test_describe_customized_adds_what_the_handler_says",
        "ListModels": "test_list_models_pages_through_every_model_name",
        "RegisterModel": "test_two_versions_side_by_side_then_a_new_default",
        "ScaleWorker": "test_scale_worker_up_and_down",
        "SetDefault": "test_two_versions_side_by_side_then_a_new_default",
        "UnregisterModel": "test_two_versions_side_by_side_then_a_new_default",
    },
    "org.pytorch.serve.grpc.openinference.GRPCInferenceService": {
        "ServerLive": "test_oip_health_and_metadata",
        "ServerReady": "test_oip_health_and_metadata",
        "ModelReady": "test_oip_health_and_metadata",
        "ServerMetadata": "test_oip_health_and_metadata",
        "ModelMetadata": "test_oip_health_and_metadata",
        "ModelInfer": "test_predict_oip_answers_what_the_torchserve_api_answers_on_the_same_port",
    },
}


def test_every_rpc_of_the_stubs_has_a_test():
    """A TorchServe upgrade that adds an RPC fails here until a test calls it."""
    services = {
        service.full_name: {method.name for method in service.methods}
        for module in (inference_pb2, management_pb2, open_inference_grpc_pb2)
        for service in module.DESCRIPTOR.services_by_name.values()
    }
    assert services == {name: set(tests) for name, tests in RPC_TESTS.items()}
    for tests in RPC_TESTS.values():
        for test in tests.values():
            assert callable(globals().get(test)), test
