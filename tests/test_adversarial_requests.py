"""Requests built to hurt, against a real TorchServe: each gets one bounded answer, and the worker
that read it goes on serving (issue 12, the handler's half).

Each case was first sent to TorchServe 0.12.0 with the handler as it was before the fix; what
the server answered then is quoted in the test's docstring ("Before:").
"""

from __future__ import annotations

import json
import urllib.request
import uuid

import grpc
import pytest
from conftest import assert_no_server_left, server_processes

from digitserve import preprocessing, synthetic, worst_case
from digitserve.client import DigitClient, read_key
from digitserve.config import MODEL_NAME
from digitserve.grpc_stubs import (
    inference_pb2,
    inference_pb2_grpc,
    open_inference_grpc_pb2,
    open_inference_grpc_pb2_grpc,
)
from digitserve.server import TorchServe

pytestmark = pytest.mark.integration

#: What TorchServe's gRPC frontend appends to every error description the handler raises.
FRONTEND_SUFFIX = "\norg.pytorch.serve.http.InternalServerException"
#: How much one refused request may raise the worker's peak RSS (MiB): the refusals below cost
#: under 1 MiB here; before the fix, [20000000, 0] cost 1,988 MiB.
REFUSAL_PEAK_MB = 50
#: How much one request at the kit's limits may raise it (MiB): measured 48-107 MiB here
#: (``worst_case``), so four times the worst; before the fix a 16-megapixel RGBA PNG took 630.
LIMIT_PEAK_MB = 400


@pytest.fixture(scope="module")
def png(mnist_test) -> bytes:
    return synthetic.png(mnist_test[0][0].numpy())


@pytest.fixture(params=["server", "batching_server"], ids=["batching off", "batching on (8)"])
def any_server(request) -> TorchServe:
    return request.getfixturevalue(request.param)




def worker_pids(server: TorchServe) -> list[int]:
    return sorted(proc.pid for proc in server_processes(server.process.pid)
                  if "model_service_worker" in " ".join(proc.cmdline()))


def described_workers(server: TorchServe) -> list[tuple[int, str]]:
    """(pid, status) of every worker, as DescribeModel reports them."""
    with DigitClient.for_run_dir(server.run_dir) as client:
        return sorted((int(w["pid"]), w["status"])
                      for version in client.describe() for w in version["workers"])


def call(server: TorchServe, method: str, request, timeout: float = 20):
    """One call through the bare stubs: the reply (a list for a stream) or the RpcError."""
    channel = grpc.insecure_channel(f"127.0.0.1:{server.settings.ports.grpc_inference}")
    metadata = (("authorization", f"Bearer {read_key(server.key_file, 'inference')}"),)
    with channel:
        stubs = {"ModelInfer": open_inference_grpc_pb2_grpc.GRPCInferenceServiceStub(channel)}
        stub = stubs.get(method) or inference_pb2_grpc.InferenceAPIsServiceStub(channel)
        try:
            reply = getattr(stub, method)(request, timeout=timeout, metadata=metadata)
            return list(reply) if method == "StreamPredictions" else reply
        except grpc.RpcError as err:
            return err


def predictions(server: TorchServe, inputs: dict[str, bytes], method: str = "Predictions"):
    return call(server, method, inference_pb2.PredictionsRequest(model_name=MODEL_NAME,
                                                                 input=inputs))


def handler_message(err: grpc.RpcError) -> str:
    """The handler's own part of an error description (without the frontend's suffix)."""
    details = err.details() or ""
    return details[: -len(FRONTEND_SUFFIX)] if details.endswith(FRONTEND_SUFFIX) else details


def assert_bounded_refusal(err: object, phrase: str) -> None:
    assert isinstance(err, grpc.RpcError), f"answered: {err!r}"[:300]
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.code(), err.details()[:300])
    message = handler_message(err)
    assert phrase in message, message
    assert message.isprintable() and len(message) <= preprocessing.MAX_MESSAGE_CHARS, message


def new_log(server: TorchServe, offset: int) -> str:
    with open(server.log_file, "rb") as log:
        log.seek(offset)
        return log.read().decode(errors="replace")


# -- 1. streaming only where the call is a stream ------------------------------------------------
def test_a_unary_call_carrying_stream_gets_one_answer_and_the_worker_lives_on(any_server, png):
    """Before (both batch settings): the call got the top-3 intermediate answer; the frontend
    logged IllegalStateException "Stream is already completed", the worker "Frontend
    disconnected" and exited, DescribeModel still said READY, and every later call ended in
    DEADLINE_EXCEEDED until TorchServe was restarted."""
    pids, described = worker_pids(any_server), described_workers(any_server)
    assert pids and [pid for pid, _ in described] == pids
    offset = any_server.log_file.stat().st_size
    reply = predictions(any_server, {"data": png, "stream": b"1"})
    assert not isinstance(reply, grpc.RpcError), reply
    answer = json.loads(reply.prediction)
    assert set(answer) == {"digit", "probability", "probabilities", "model_version"}
    for _ in range(5):
        again = predictions(any_server, {"data": png})
        assert not isinstance(again, grpc.RpcError), again
        assert json.loads(again.prediction) == answer
    assert described_workers(any_server) == described
    assert all(status == "READY" for _, status in described)
    assert worker_pids(any_server) == pids
    log = new_log(any_server, offset)
    assert "Stream is already completed" not in log and "Frontend disconnected" not in log


def test_stream_predictions_gets_the_same_one_answer(server, png):
    """Before: with ``stream``, the top-3 message and then the answer; without it, the answer.
    Now one message either way, the unary answer."""
    unary = json.loads(predictions(server, {"data": png}).prediction)
    for inputs in ({"data": png, "stream": b"1"}, {"data": png}):
        replies = predictions(server, inputs, method="StreamPredictions")
        assert not isinstance(replies, grpc.RpcError), replies
        assert [json.loads(reply.prediction) for reply in replies] == [unary]


def test_rest_with_a_stream_field_gets_one_plain_answer(server, png):
    """Before: HTTP 200 with two JSON documents back to back (top-3, then the answer). A
    ``stream`` query parameter never reached the handler, then or now."""
    boundary = uuid.uuid4().hex
    form = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"data\"; filename=\"d.png\""
            f"\r\nContent-Type: image/png\r\n\r\n").encode() + png + (
            f"\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"stream\"\r\n\r\n1\r\n"
            f"--{boundary}--\r\n").encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{server.settings.ports.http_inference}/predictions/{MODEL_NAME}",
        data=form, method="POST", headers={
            "Authorization": f"Bearer {read_key(server.key_file, 'inference')}",
            "Content-Type": f"multipart/form-data; boundary={boundary}"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(request, timeout=20) as response:
        assert response.status == 200
        assert response.headers.get("Transfer-Encoding") is None
        assert response.headers.get("ts_stream_next") is None
        answer = json.loads(response.read())
    assert answer == json.loads(predictions(server, {"data": png}).prediction)


# -- 2, 3. cost and messages bounded -------------------------------------------------------------
def test_input_maps_built_to_hurt_get_a_bounded_refusal(server, png):
    """Before: a 100,000-character key and 20,000 keys got INTERNAL "Stream removed
    (RST_STREAM ...)" (the echoed key names overflowed the gRPC trailer); a key holding
    "\\r\\nHTTP/1.1 200 OK" was echoed raw into the trailer."""
    pids = worker_pids(server)
    cases = {
        "an input key is 100,000 characters long": {"k" * 100_000: png},
        "the request holds 20,000 input keys": {f"key{i:06d}": b"" for i in range(20_000)},
        "keys received: a??HTTP/1.1 200 OK??": {"a\r\nHTTP/1.1 200 OK\r\n": png},
    }
    for phrase, inputs in cases.items():
        assert_bounded_refusal(predictions(server, inputs), phrase)
    assert worker_pids(server) == pids


def oip_tensor(datatype: str, shape: list[int], **contents):
    return open_inference_grpc_pb2.ModelInferRequest(model_name=MODEL_NAME, inputs=[
        open_inference_grpc_pb2.ModelInferRequest.InferInputTensor(
            name="image", datatype=datatype, shape=shape,
            contents=open_inference_grpc_pb2.InferTensorContents(**contents))])


def test_oip_tensors_are_measured_before_anything_is_built(oip_server, png):
    """Before: shape [20000000, 0] with no values (a 37-byte request) took 40 s and 1,988 MiB of
    the worker to be refused; [-28, -28] got "(ValueError: can only specify one unknown
    dimension)"; 998 sizes of 1 before [28, 28] were answered as an image; a 100,000-character
    datatype got INTERNAL "Stream removed"."""
    pixels = list(range(0, 784 * 3, 3))
    cases = {
        "shape [20000000, 0] is not an image's": oip_tensor("UINT8", [20_000_000, 0]),
        "shape [-28, -28] is not an image's": oip_tensor("UINT8", [-28, -28],
                                                         uint_contents=pixels),
        "(1,000 sizes)": oip_tensor("UINT8", [1] * 998 + [28, 28], uint_contents=pixels),
        "[461168601842..., 461168601842...]": oip_tensor("UINT8", [2**62, 2**62]),
        "over the kit's limit of 4,194,304": oip_tensor("UINT8", [2049, 2048]),
        "input datatype 'XXXXXXXX": oip_tensor("X" * 100_000, [28, 28]),
    }
    pid = worker_pids(oip_server)[0]
    for phrase, request in cases.items():
        with worst_case.PeakMemory(pid) as peak:
            assert_bounded_refusal(call(oip_server, "ModelInfer", request), phrase)
        assert peak.rise_mb is None or peak.rise_mb < REFUSAL_PEAK_MB, (phrase, peak.rise_mb)
    assert worker_pids(oip_server) == [pid]
    answer = call(oip_server, "ModelInfer", oip_tensor("BYTES", [1], bytes_contents=[png]))
    assert not isinstance(answer, grpc.RpcError), answer


# -- 4. NaN and infinity in OIP tensors ----------------------------------------------------------
def test_oip_nan_is_refused_by_the_frontend_before_any_handler_runs(oip_server, png):
    """Pinned TorchServe 0.12.0 behaviour, not the kit's: the frontend turns a ModelInfer request
    into JSON with Gson before any Python runs, and Gson refuses NaN and infinities
    (IllegalArgumentException), so the call ends in UNKNOWN with no message, before and after
    the fix; no handler can answer it. The server is unharmed. The same tensor sent as REST
    JSON does reach the handler, which refuses it (HTTP 400, "finite")."""
    pids = worker_pids(oip_server)
    for datatype, field in (("FP32", "fp32_contents"), ("FP64", "fp64_contents")):
        for bad in (float("nan"), float("inf")):
            err = call(oip_server, "ModelInfer",
                       oip_tensor(datatype, [28, 28], **{field: [bad] + [0.0] * 783}))
            assert isinstance(err, grpc.RpcError) and err.code() == grpc.StatusCode.UNKNOWN
            assert not err.details()
    body = ('{"inputs": [{"name": "x", "datatype": "FP32", "shape": [28, 28], "data": [NaN'
            + ", 0" * 783 + "]}]}").encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{oip_server.settings.ports.http_inference}/predictions/{MODEL_NAME}",
        data=body, method="POST", headers={
            "Authorization": f"Bearer {read_key(oip_server.key_file, 'inference')}",
            "Content-Type": "application/json"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with pytest.raises(urllib.error.HTTPError) as refused:
        opener.open(request, timeout=20)
    assert refused.value.code == 400
    assert "finite numbers" in json.loads(refused.value.read())["message"]
    assert worker_pids(oip_server) == pids
    ok = call(oip_server, "ModelInfer", oip_tensor("BYTES", [1], bytes_contents=[png]))
    assert not isinstance(ok, grpc.RpcError), ok


# -- 5. one request's cost, at the limits -------------------------------------------------------
def test_the_costliest_requests_cost_one_worker_a_bounded_amount(model_store, tmp_path):
    """The most expensive requests the limits allow, sent to a TorchServe of their own
    (``worst_case``): each is answered by the same worker, whose peak RSS rises by less than
    ``LIMIT_PEAK_MB``. Before the fix the limit was 16 megapixels; a 4000×4000 RGBA PNG raised
    the worker's peak RSS by 630 MiB in 5.6 s, and [20000000, 0] by 1,988 MiB."""
    cases = ("png_rgba", "webp", "oip_uint8", "over_the_limit", "oip_empty_rows")
    result = worst_case.measure(model_store, repeats=1, cases=cases, run_dir=tmp_path / "run")
    assert_no_server_left(str(tmp_path / "run"))
    rows = {row["case"]: row for row in result["cases"]}
    assert list(rows) == list(cases)
    for name, row in rows.items():
        refused = name in ("over_the_limit", "oip_empty_rows")
        for answer in (row["served_answer"], row["in_process_answer"]):
            assert (answer == "INVALID_ARGUMENT") if refused else answer.startswith("digit "), row
        assert row["same_worker"] is True, row
        for figure in ("worker_peak_rise_mb", "in_process_peak_rise_mb"):
            limit = REFUSAL_PEAK_MB if refused else LIMIT_PEAK_MB
            assert row[figure] is None or row[figure] < limit, (name, figure, row[figure])
    peaks = [row["worker_peak_rise_mb"] for row in rows.values()
             if row["worker_peak_rise_mb"] is not None]
    assert result["worst"]["worker_peak_rise_mb"] == (max(peaks) if peaks else None)
