"""A gRPC client for the served DigitCNN: one channel per server, token metadata, deadlines.

Every call carries ``authorization: Bearer <key>`` (TorchServe 0.12.0 enforces tokens, on gRPC
too, Ping included) and a deadline; every failure becomes a ``ServingError`` subclass whose
message says what happened and what to do.
"""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
from google.protobuf import empty_pb2

from digitserve import retry
from digitserve.config import (
    HOST,
    MAX_MESSAGE_BYTES,
    MODEL_NAME,
    RPC_DEADLINE_S,
    RUN_DIR,
    WORKER_DEADLINE_S,
)
from digitserve.grpc_stubs import (
    inference_pb2,
    inference_pb2_grpc,
    management_pb2,
    management_pb2_grpc,
)
from digitserve.progress import progress as progress_bar

#: Channel options shared by every channel the kit opens: message sizes match the server's
#: ``max_request_size``; keepalive pings find a dead server between calls.
CHANNEL_OPTIONS = (
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.enable_retries", 1),
    # Idempotent predictions (Predictions, OIP ModelInfer) are retried when no worker could take
    # them; which codes, and why, is in digitserve.retry (with the interceptor of _channel).
    ("grpc.service_config", retry.service_config()),
)


#: The most image bytes one request may carry: the message limit less room for the envelope.
MAX_IMAGE_BYTES = MAX_MESSAGE_BYTES - 4096


class ServingError(Exception):
    """A call to TorchServe failed; the message says why and what to do.

    ``code`` is the gRPC status name (e.g. ``INVALID_ARGUMENT``), or ``OK`` for an error
    answer inside a batch, or ``""`` when the client refused before sending.
    """

    def __init__(self, message: str, code: str = "") -> None:
        super().__init__(message)
        self.code = code


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
            raise InvalidInputError(answer["error"], "OK")
        return cls(answer["digit"], answer["probability"], answer["probabilities"],
                   answer.get("model_version", ""))


def _channel(target: str, tls_cert: Path | None) -> grpc.Channel:
    if tls_cert is None:
        channel = grpc.insecure_channel(target, CHANNEL_OPTIONS)
    else:
        credentials = grpc.ssl_channel_credentials(root_certificates=Path(tls_cert).read_bytes())
        channel = grpc.secure_channel(target, credentials, CHANNEL_OPTIONS)
    return grpc.intercept_channel(channel, retry.ReplicaDeathRetry())


def token_refused(err: grpc.RpcError) -> bool:
    """PERMISSION_DENIED because of the token (not because the model API is off)."""
    return (err.code() == grpc.StatusCode.PERMISSION_DENIED
            and "model api" not in (err.details() or "").lower())


def _status_name(value: int) -> str:
    """The name of a numeric google.rpc status code, e.g. 3 → ``INVALID_ARGUMENT``."""
    return next((code.name for code in grpc.StatusCode if code.value[0] == value), str(value))


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
        tls_cert: Path | None = None,
        token_api_url: str | None = None,
    ) -> None:
        """Open one channel per API. ``tls_cert``: trust this certificate and use TLS.

        ``token_api_url`` is TorchServe's HTTP management address; with it an expired key is
        renewed (TorchServe renews keys over HTTP only) and the call retried once.
        """
        self.key_file = Path(key_file) if key_file else None
        self.deadline_s = deadline_s
        self.model_name = model_name
        self.token_api_url = token_api_url
        self.inference_channel = _channel(inference_target, tls_cert)
        self.management_channel = _channel(management_target, tls_cert)
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
        tls_cert = state.get("tls_cert")
        return cls(f"{host}:{ports['grpc_inference']}", f"{host}:{ports['grpc_management']}",
                   key_file=Path(state["key_file"]),
                   tls_cert=Path(tls_cert) if tls_cert else None,
                   token_api_url=f"http://{host}:{ports['http_management']}", **kwargs)

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
        request = self._prediction_request(image, version, model)
        reply = self._call(self.inference.Predictions, request, "inference",
                           model=model or self.model_name, version=version)
        return Prediction.from_json(reply.prediction)

    def predict_inputs(self, inputs: dict[str, bytes], version: str = "") -> Prediction:
        """Predictions with a hand-made input map (to see what the server does with it)."""
        request = inference_pb2.PredictionsRequest(
            model_name=self.model_name, model_version=version, input=inputs
        )
        reply = self._call(self.inference.Predictions, request, "inference",
                           model=self.model_name, version=version)
        return Prediction.from_json(reply.prediction)

    def _prediction_request(self, image: bytes | str | Path, version: str, model: str | None,
                            stream: bool = False) -> inference_pb2.PredictionsRequest:
        """The request for one image; refused here, before sending, when it is over the limit."""
        data = Path(image).read_bytes() if isinstance(image, (str, Path)) else image
        if len(data) > MAX_IMAGE_BYTES:
            raise RequestTooLargeError(
                f"the image is {len(data):,} bytes; requests are limited to {MAX_IMAGE_BYTES:,} "
                f"bytes of image (config.MAX_MESSAGE_BYTES, shared with the server): scale it down."
            )
        inputs = {"data": data, **({"stream": b"1"} if stream else {})}
        return inference_pb2.PredictionsRequest(
            model_name=model or self.model_name, model_version=version, input=inputs
        )

    def predict_many(self, images: Sequence[bytes | str | Path], concurrency: int = 16,
                     version: str = "", progress: bool = True) -> list[Prediction | ServingError]:
        """Predict many images with at most ``concurrency`` calls in flight, in input order.

        A failed image gives its ``ServingError`` in its place instead of stopping the rest.
        """
        def one(image: bytes | str | Path) -> Prediction | ServingError:
            try:
                return self.predict(image, version=version)
            except ServingError as err:
                return err

        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            results = pool.map(one, images)
            return list(progress_bar(results, total=len(images), desc="gRPC predictions",
                                 disable=not progress))

    def stream(self, image: bytes | str | Path, version: str = "", model: str | None = None
               ) -> Iterator[dict]:
        """StreamPredictions: yields the top-3 digits first, then the full answer (a dict)."""
        request = self._prediction_request(image, version, model, stream=True)
        try:
            for reply in self.inference.StreamPredictions(
                request, timeout=self.deadline_s, metadata=self.metadata("inference")
            ):
                answer = json.loads(reply.prediction)
                if "error" in answer:
                    raise InvalidInputError(answer["error"])
                yield answer
        except grpc.RpcError as err:
            raise self._translate(err, model or self.model_name, version) from None

    def stream_bidirectional(self, images: Iterable[bytes], sequence_id: str,
                             version: str = "", model: str | None = None) -> Iterator[bytes]:
        """StreamPredictions2: many requests in, many answers out, on one call.

        TorchServe 0.12.0 accepts it only for *stateful* (sequence) models; for others each
        answer carries a ``google.rpc.Status`` error, which is raised as ``ServingError``.
        """
        requests = (
            inference_pb2.PredictionsRequest(
                model_name=model or self.model_name, model_version=version,
                input={"data": data}, sequence_id=sequence_id,
            )
            for data in images
        )
        try:
            for reply in self.inference.StreamPredictions2(
                requests, timeout=self.deadline_s, metadata=self.metadata("inference")
            ):
                if reply.HasField("status") and reply.status.code != 0:
                    code = _status_name(reply.status.code)
                    raise ServingError(f"StreamPredictions2: {code}: {reply.status.message}")
                yield reply.prediction
        except grpc.RpcError as err:
            raise self._translate(err, model or self.model_name, version) from None

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

    def register(self, mar: str, initial_workers: int = 1, batch_size: int = 1,
                 max_batch_delay_ms: int = 5, synchronous: bool = True) -> str:
        """RegisterModel from the local model store (``mar`` is a file name in it)."""
        request = management_pb2.RegisterModelRequest(
            url=mar, initial_workers=initial_workers, batch_size=batch_size,
            max_batch_delay=max_batch_delay_ms, synchronous=synchronous,
        )
        return self._management(self.management.RegisterModel, request, mar,
                                deadline_s=WORKER_DEADLINE_S)

    def scale(self, min_workers: int, max_workers: int | None = None, version: str = "",
              model: str | None = None, synchronous: bool = True) -> str:
        """ScaleWorker: set how many Python workers serve the model."""
        request = management_pb2.ScaleWorkerRequest(
            model_name=model or self.model_name, model_version=version, min_worker=min_workers,
            max_worker=max_workers or min_workers, synchronous=synchronous,
        )
        return self._management(self.management.ScaleWorker, request, model, version,
                                deadline_s=WORKER_DEADLINE_S)

    def set_default(self, version: str, model: str | None = None) -> str:
        """SetDefault: the version that answers when a request names none."""
        request = management_pb2.SetDefaultRequest(
            model_name=model or self.model_name, model_version=version
        )
        return self._management(self.management.SetDefault, request, model, version)

    def unregister(self, version: str = "", model: str | None = None) -> str:
        """UnregisterModel: stop serving one version (or the default one)."""
        request = management_pb2.UnregisterModelRequest(
            model_name=model or self.model_name, model_version=version
        )
        return self._management(self.management.UnregisterModel, request, model, version)

    def _management(self, method, request, model: str | None, version: str = "",
                    deadline_s: float | None = None) -> str:
        reply = self._call(method, request, "management", model or self.model_name, version,
                           deadline_s=deadline_s)
        try:
            return json.loads(reply.msg).get("status", reply.msg)
        except ValueError:
            return reply.msg

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
        """The ``authorization`` metadata for the ``inference`` or ``management`` API."""
        if self.key_file is None:
            return ()
        return (("authorization", f"Bearer {read_key(self.key_file, api)}"),)

    def _call(self, method, request, api: str, model: str = "", version: str = "",
              deadline_s: float | None = None):
        """One unary call with deadline and token; a refused token is renewed and retried once.

        Calls that wait for workers to start (register, scale) get at least WORKER_DEADLINE_S.
        """
        timeout = max(self.deadline_s, deadline_s or 0)
        for attempt in (1, 2):
            metadata = self.metadata(api)
            try:
                return method(request, timeout=timeout, metadata=metadata)
            except grpc.RpcError as err:
                if attempt == 1 and token_refused(err) and self.renew_key(api, metadata):
                    continue
                raise self._translate(err, model, version) from None

    def renew_key(self, api: str, sent: tuple[tuple[str, str], ...]) -> bool:
        """Get a key other than the one ``sent``: re-read the key file, else ask TorchServe.

        True when there is a new key to try. TorchServe's keys expire (60 minutes by default,
        ``token_expiration_min``) and can only be renewed over its HTTP management API, with
        the ``API`` key from the same file.
        """
        if self.key_file is None or not self.key_file.is_file():
            return False
        if self.metadata(api) != sent:
            return True
        if not self.token_api_url:
            return False
        api_key = read_key(self.key_file, "API")
        request = urllib.request.Request(
            f"{self.token_api_url}/token?type={api}", method="POST",
            headers={"Authorization": f"Bearer {api_key}"},
        )
        try:
            with urllib.request.urlopen(request, timeout=self.deadline_s):
                pass
        except OSError:
            return False
        return self.metadata(api) != sent

    def _translate(self, err: grpc.RpcError, model: str, version: str) -> ServingError:
        error = self._explain(err, model, version)
        error.code = err.code().name
        return error

    def _explain(self, err: grpc.RpcError, model: str, version: str) -> ServingError:
        code = err.code()
        details = (err.details() or "").split("\n")[0]
        target = f"{model} version {version}" if version else model
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            return InvalidInputError(details)
        if code == grpc.StatusCode.PERMISSION_DENIED and "model api" in details.lower():
            return ServingError(
                f"{details}: registering and unregistering models needs TorchServe's model API, "
                "which the kit leaves off unless asked: start the server with "
                "ServerSettings(enable_model_api=True) (it then admits only the local model store)."
            )
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
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED and "worker died" in details.lower():
            return ServerUnavailableError(
                f"the worker handling this request died ({details}); TorchServe restarts it: "
                "try again, and see logs/model_log.log in the run directory if it repeats."
            )
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


class AsyncDigitClient:
    """The ``grpc.aio`` flavour of ``DigitClient.predict``, for asyncio code and notebooks.

    It borrows the synchronous client's key handling, request checks and error messages.
    """

    def __init__(self, client: DigitClient, inference_target: str,
                 tls_cert: Path | None = None) -> None:
        self.client = client
        interceptors = [retry.AsyncReplicaDeathRetry()]
        if tls_cert is None:
            self.channel = grpc.aio.insecure_channel(inference_target, CHANNEL_OPTIONS,
                                                     interceptors=interceptors)
        else:
            credentials = grpc.ssl_channel_credentials(Path(tls_cert).read_bytes())
            self.channel = grpc.aio.secure_channel(inference_target, credentials, CHANNEL_OPTIONS,
                                                   interceptors=interceptors)
        self.inference = inference_pb2_grpc.InferenceAPIsServiceStub(self.channel)

    @classmethod
    def for_run_dir(cls, run_dir: Path = RUN_DIR, **kwargs) -> AsyncDigitClient:
        client = DigitClient.for_run_dir(run_dir, **kwargs)
        state = json.loads((Path(run_dir) / "server.json").read_text())
        target = f"{state.get('host', HOST)}:{state['ports']['grpc_inference']}"
        tls_cert = state.get("tls_cert")
        return cls(client, target, Path(tls_cert) if tls_cert else None)

    async def predict(self, image: bytes | str | Path, version: str = "",
                      model: str | None = None) -> Prediction:
        """Classify one image; same errors as ``DigitClient.predict``."""
        request = self.client._prediction_request(image, version, model)
        for attempt in (1, 2):
            metadata = self.client.metadata("inference")
            try:
                reply = await self.inference.Predictions(
                    request, timeout=self.client.deadline_s, metadata=metadata
                )
                return Prediction.from_json(reply.prediction)
            except grpc.aio.AioRpcError as err:
                if (attempt == 1 and token_refused(err)
                        and self.client.renew_key("inference", metadata)):
                    continue
                raise self.client._translate(err, model or self.client.model_name,
                                             version) from None

    async def predict_many(self, images: Sequence[bytes | str | Path], concurrency: int = 16,
                           version: str = "", progress: bool = True
                           ) -> list[Prediction | ServingError]:
        """Like ``DigitClient.predict_many``, with asyncio tasks instead of threads."""
        gate = asyncio.Semaphore(concurrency)
        bar = progress_bar(total=len(images), desc="gRPC predictions (aio)",
                           disable=not progress)

        async def one(image: bytes | str | Path) -> Prediction | ServingError:
            async with gate:
                try:
                    return await self.predict(image, version=version)
                except ServingError as err:
                    return err
                finally:
                    bar.update()

        try:
            return list(await asyncio.gather(*(one(image) for image in images)))
        finally:
            bar.close()

    async def close(self) -> None:
        await self.channel.close()
        self.client.close()
