"""A real TorchServe, called over real gRPC, answers what the model answers in-process."""

from __future__ import annotations

import base64
import io
import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import psutil
import pytest
import torch
from PIL import Image

from digitserve import client, evaluate, preprocessing
from digitserve.config import HOST, MAX_MESSAGE_BYTES, MODEL_NAME, MODEL_VERSION
from digitserve.grpc_stubs import (
    inference_pb2,
    inference_pb2_grpc,
    management_pb2,
    management_pb2_grpc,
)
from digitserve.server import free_ports

pytestmark = pytest.mark.integration

N_IMAGES = 200


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def handler_message(payload: object) -> str:
    """What the handler's preprocessing says about a bad payload, computed in-process."""
    with pytest.raises(preprocessing.InvalidInput) as raised:
        preprocessing.digit_from_payload(payload)
    return str(raised.value)


@pytest.fixture(scope="module")
def images(mnist_test) -> tuple[list[bytes], torch.Tensor]:
    """The first 200 real MNIST test images as PNG bytes, and their labels."""
    raw, labels = mnist_test
    return [png(image) for image in raw[:N_IMAGES].numpy()], labels[:N_IMAGES]


@pytest.fixture(scope="module")
def in_process(mnist_test, trained_weights) -> torch.Tensor:
    """Probabilities of the same weights, computed in this process: (200, 10)."""
    model = evaluate.load_model(trained_weights)
    digits = preprocessing.normalize_digits(mnist_test[0][:N_IMAGES])
    return evaluate.predict_logits(model, digits).softmax(dim=1)


@pytest.fixture(scope="module")
def digit_client(server):
    with client.DigitClient.for_run_dir(server.run_dir) as c:
        yield c


def keys(server) -> dict:
    return json.loads(server.key_file.read_text())


def auth(server, api: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {keys(server)[api]['key']}"),)


def test_list_models_has_the_model(digit_client):
    models = digit_client.list_models()
    assert [m["modelName"] for m in models] == [MODEL_NAME]
    assert models[0]["modelUrl"] == "digit-model.mar"


def test_describe_shows_a_ready_worker(digit_client):
    (description,) = digit_client.describe()
    assert description["modelName"] == MODEL_NAME
    assert description["modelVersion"] == MODEL_VERSION
    assert description["batchSize"] == 1
    assert [w["status"] for w in description["workers"]] == ["READY"]
    assert digit_client.is_ready()


# -- predictions -----------------------------------------------------------------------------
def test_served_predictions_equal_in_process_predictions(digit_client, images, in_process):
    pngs, labels = images
    answers = [digit_client.predict(data) for data in pngs]
    served = torch.tensor([a.probabilities for a in answers])
    digits = torch.tensor([a.digit for a in answers])
    assert torch.equal(digits, in_process.argmax(dim=1))
    assert torch.allclose(served, in_process, atol=1e-4)
    assert torch.allclose(torch.tensor([a.probability for a in answers]),
                          in_process.max(dim=1).values, atol=1e-4)
    assert {a.model_version for a in answers} == {MODEL_VERSION}
    # The answers mean something: many different digits, mostly the right ones.
    assert len(set(digits.tolist())) >= 8
    assert (digits == labels).float().mean() >= 0.8


def test_pixel_list_and_base64_payloads(digit_client, mnist_test, in_process):
    image = mnist_test[0][1].numpy()
    for payload in (json.dumps(image.tolist()).encode(), png(255 - image),
                    base64.b64encode(png(image))):
        answer = digit_client.predict(payload)
        assert answer.digit == int(in_process[1].argmax())
        assert np.allclose(answer.probabilities, in_process[1].numpy(), atol=1e-3)


def test_predict_reads_an_image_file(digit_client, images, in_process, tmp_path):
    path = tmp_path / "digit.png"
    path.write_bytes(images[0][3])
    assert digit_client.predict(path).digit == int(in_process[3].argmax())
    assert digit_client.predict(str(path)).digit == int(in_process[3].argmax())


def test_explicit_version(digit_client, images, in_process):
    assert digit_client.predict(images[0][0], version=MODEL_VERSION).digit == int(
        in_process[0].argmax())


# -- errors ----------------------------------------------------------------------------------
def test_call_without_token_is_permission_denied(server, images):
    port = server.settings.ports
    with grpc.insecure_channel(f"{HOST}:{port.grpc_inference}") as channel:
        stub = inference_pb2_grpc.InferenceAPIsServiceStub(channel)
        request = inference_pb2.PredictionsRequest(model_name=MODEL_NAME,
                                                   input={"data": images[0][0]})
        with pytest.raises(grpc.RpcError) as raised:
            stub.Predictions(request, timeout=10)
        assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
        wrong = (("authorization", "Bearer not-the-key"),)
        with pytest.raises(grpc.RpcError) as raised:
            stub.Predictions(request, timeout=10, metadata=wrong)
        assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
        # The same call with the key goes through, so the refusal was about the token.
        assert stub.Predictions(request, timeout=10, metadata=auth(server, "inference")).prediction
    with grpc.insecure_channel(f"{HOST}:{port.grpc_management}") as channel:
        stub = management_pb2_grpc.ManagementAPIsServiceStub(channel)
        with pytest.raises(grpc.RpcError) as raised:
            stub.ListModels(management_pb2.ListModelsRequest(limit=10), timeout=10)
        assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_inference_key_does_not_open_management(server):
    port = server.settings.ports
    with grpc.insecure_channel(f"{HOST}:{port.grpc_management}") as channel:
        stub = management_pb2_grpc.ManagementAPIsServiceStub(channel)
        with pytest.raises(grpc.RpcError) as raised:
            stub.ListModels(management_pb2.ListModelsRequest(limit=10), timeout=10,
                            metadata=auth(server, "inference"))
        assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_wrong_key_file_raises_auth_error(server, images, tmp_path):
    fake = tmp_path / "key_file.json"
    fake.write_text(json.dumps({api: {"key": "wrong"} for api in ("inference", "management")}))
    port = server.settings.ports
    with client.DigitClient(f"{HOST}:{port.grpc_inference}", f"{HOST}:{port.grpc_management}",
                            key_file=fake) as c:
        with pytest.raises(client.AuthError, match=str(fake)):
            c.predict(images[0][0])


def test_unknown_model_names_it_and_lists_the_served_ones(digit_client, images):
    with pytest.raises(client.ModelNotFoundError) as raised:
        digit_client.predict(images[0][0], model="nosuchmodel")
    message = str(raised.value)
    assert "nosuchmodel" in message
    assert MODEL_NAME in message.split("nosuchmodel", 1)[1]


def test_unknown_version_names_the_model_and_lists_the_served_ones(digit_client, images):
    with pytest.raises(client.ModelNotFoundError, match="9.9") as raised:
        digit_client.predict(images[0][0], version="9.9")
    assert f"{MODEL_NAME} version 9.9 is not served" in str(raised.value)
    assert f"Served models: {MODEL_NAME}." in str(raised.value)


def test_oversized_request_is_refused_before_sending(digit_client):
    too_big = b"\x00" * (MAX_MESSAGE_BYTES + 1)
    with pytest.raises(client.RequestTooLargeError, match="bytes"):
        digit_client.predict(too_big)
    # Against an address where nothing listens the same call fails the same way: the client
    # refused it before any connection was tried (a sent call would be UNAVAILABLE).
    ports = free_ports()
    with client.DigitClient(f"{HOST}:{ports.grpc_inference}", f"{HOST}:{ports.grpc_management}",
                            deadline_s=5) as nowhere:
        with pytest.raises(client.RequestTooLargeError):
            nowhere.predict(too_big)
        with pytest.raises(client.ServerUnavailableError):
            nowhere.predict(b"\x00" * 100)


def test_large_request_under_the_limit_reaches_the_handler(digit_client):
    payload = b"\x00" * (MAX_MESSAGE_BYTES // 2)
    with pytest.raises(client.InvalidInputError) as raised:
        digit_client.predict(payload)
    assert str(raised.value) == handler_message(payload)


# -- the blog's raw client -------------------------------------------------------------------
def test_blog_raw_client_code_works_with_token_metadata(server, images, in_process):
    ports = server.settings.ports
    channel = grpc.insecure_channel(f"localhost:{ports.grpc_inference}")
    stub = inference_pb2_grpc.InferenceAPIsServiceStub(channel)
    request = inference_pb2.PredictionsRequest(model_name="digitmodel",
                                               input={"data": images[0][0]})
    response = stub.Predictions(request, metadata=auth(server, "inference"), timeout=10)
    answer = json.loads(response.prediction.decode("utf-8"))
    assert answer["digit"] == int(in_process[0].argmax())
    channel.close()

    channel = grpc.insecure_channel(f"localhost:{ports.grpc_management}")
    stub = management_pb2_grpc.ManagementAPIsServiceStub(channel)
    response = stub.ListModels(management_pb2.ListModelsRequest(limit=10),
                               metadata=auth(server, "management"), timeout=10)
    assert [m["modelName"] for m in json.loads(response.msg)["models"]] == ["digitmodel"]
    channel.close()


# -- batching --------------------------------------------------------------------------------
NOISE_PNG = png(np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8))
BAD_PAYLOADS = [b"\x00\x01 not an image", png(np.full((28, 28), 255, dtype=np.uint8)),
                b"[[1, 2], [3]]", NOISE_PNG[: len(NOISE_PNG) // 2]]


def _mixed_requests(pngs: list[bytes], count: int = 24) -> list[tuple[int | None, bytes]]:
    """``count`` requests, every third one bad: (index of the good image or None, payload)."""
    requests = []
    for i in range(count):
        if i % 3 == 2:
            requests.append((None, BAD_PAYLOADS[i // 3 % len(BAD_PAYLOADS)]))
        else:
            requests.append((i, pngs[i]))
    return requests


def test_bad_request_inside_a_batch_gets_an_error_body(batching_server, images, in_process):
    """Inside a batch TorchServe 0.12.0 drops per-request status codes over gRPC, so the bad
    request comes back OK with ``{"error", "code": 400}`` while its neighbours get answers; a
    bad request alone gets INVALID_ARGUMENT. Both must be seen (retried a few times, because
    which requests share a batch depends on timing)."""
    ports = batching_server.settings.ports
    metadata = auth(batching_server, "inference")
    requests = _mixed_requests(images[0], count=16)
    seen_error_body = False
    with grpc.insecure_channel(f"{HOST}:{ports.grpc_inference}") as channel:
        stub = inference_pb2_grpc.InferenceAPIsServiceStub(channel)

        def call(payload: bytes, start: threading.Barrier):
            request = inference_pb2.PredictionsRequest(model_name=MODEL_NAME,
                                                       input={"data": payload})
            start.wait()
            try:
                return json.loads(stub.Predictions(request, timeout=30,
                                                   metadata=metadata).prediction)
            except grpc.RpcError as err:
                return err

        for _ in range(3):
            start = threading.Barrier(len(requests))
            with ThreadPoolExecutor(len(requests)) as pool:
                results = list(pool.map(lambda r, s=start: call(r[1], s), requests))
            for (index, payload), result in zip(requests, results, strict=True):
                if index is not None:
                    assert isinstance(result, dict) and result["digit"] == int(
                        in_process[index].argmax())
                elif isinstance(result, dict):
                    assert result == {"error": handler_message(payload), "code": 400}
                    seen_error_body = True
                    # The kit's client turns such a body into InvalidInputError, code "OK".
                    with pytest.raises(client.InvalidInputError) as raised:
                        client.Prediction.from_json(json.dumps(result).encode())
                    assert (str(raised.value), raised.value.code) == (
                        handler_message(payload), "OK")
                else:
                    assert result.code() == grpc.StatusCode.INVALID_ARGUMENT
            if seen_error_body:
                break
        assert seen_error_body, "no bad request was ever batched with others"

        alone = inference_pb2.PredictionsRequest(model_name=MODEL_NAME,
                                                 input={"data": BAD_PAYLOADS[0]})
        with pytest.raises(grpc.RpcError) as raised:
            stub.Predictions(alone, timeout=30, metadata=metadata)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert raised.value.details().startswith(handler_message(BAD_PAYLOADS[0]))


# -- isolation between servers on one host --------------------------------------------------
def test_worker_socket_is_private_to_the_run_dir(server):
    sockets = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if os.getpgid(proc.pid) != server.process.pid:
                continue
        except (ProcessLookupError, psutil.Error):
            continue
        cmdline = proc.info["cmdline"] or []
        if "--sock-name" in cmdline:
            sockets.append(Path(cmdline[cmdline.index("--sock-name") + 1]))
    assert sockets, "no model worker found in the server's process group"
    for socket_path in sockets:
        assert socket_path.is_relative_to(server.run_dir)


# -- the training run behind these weights ---------------------------------------------------
def test_short_training_run_reports_a_usable_model(trained_weights):
    metrics = json.loads(trained_weights.with_name("digitcnn.metrics.json").read_text())
    assert metrics["train_images"] == 6000
    assert metrics["test_accuracy"] >= 0.8
