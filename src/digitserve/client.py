"""A gRPC client for the served DigitCNN: one channel per server, token metadata, deadlines.

Every call carries ``authorization: Bearer <key>`` (TorchServe 0.12.0 enforces tokens, on gRPC
too, Ping included) and a deadline; every failure becomes a ``ServingError`` subclass whose
message says what happened and what to do. Channels and keys come from ``digitserve.channel``,
the server's addresses from its run record (``digitserve.runrecord``), the errors from
``digitserve.errors``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from google.protobuf import empty_pb2

from digitserve import runrecord
from digitserve.channel import CHANNEL_OPTIONS, IDEMPOTENT_REQUESTS, Keys, open_channel, read_key
from digitserve.config import (
    MODEL_NAME,
    RPC_DEADLINE_S,
    RUN_DIR,
    WORKER_DEADLINE_S,
)
from digitserve.errors import (
    AuthError,
    DeadlineError,
    InvalidInputError,
    ModelNotFoundError,
    RequestTooLargeError,
    ServerBusyError,
    ServerUnavailableError,
    ServingError,
    WorkerDiedError,
    explain,
    token_refused,
    worker_died,
)
from digitserve.grpc_stubs import (
    inference_pb2,
    inference_pb2_grpc,
    management_pb2,
    management_pb2_grpc,
)
from digitserve.payload import MAX_IMAGE_BYTES, Prediction, read_image
from digitserve.progress import progress as progress_bar

__all__ = [
    "CHANNEL_OPTIONS", "AsyncDigitClient", "AuthError", "DeadlineError", "DigitClient",
    "InvalidInputError", "ModelNotFoundError", "Prediction", "RequestTooLargeError",
    "ServerBusyError", "ServerUnavailableError", "ServingError", "WorkerDiedError", "read_key",
    "token_refused", "MAX_IMAGE_BYTES", "read_image",
]

def _status_name(value: int) -> str:
    """The name of a numeric google.rpc status code, e.g. 3 → ``INVALID_ARGUMENT``."""
    return next((code.name for code in grpc.StatusCode if code.value[0] == value), str(value))


class _Base:
    """What the blocking and the asyncio client share: key handling, requests, errors."""

    keys: Keys
    deadline_s: float
    model_name: str

    @property
    def key_file(self) -> Path | None:
        return self.keys.key_file

    @property
    def token_api_url(self) -> str | None:
        return self.keys.token_api_url

    def metadata(self, api: str) -> tuple[tuple[str, str], ...]:
        """The ``authorization`` metadata for the ``inference`` or ``management`` API."""
        return self.keys.metadata(api)

    def renew_key(self, api: str, sent: tuple[tuple[str, str], ...]) -> bool:
        """A new key to try after ``sent`` was refused (see ``channel.Keys.renew``)."""
        return self.keys.renew(api, sent)

    def _prediction_request(self, image: bytes | str | Path, version: str, model: str | None
                            ) -> inference_pb2.PredictionsRequest:
        """The request for one image; refused here, before sending, when it is over the limit."""
        return inference_pb2.PredictionsRequest(
            model_name=model or self.model_name, model_version=version,
            input={"data": read_image(image)},
        )

    def _retry(self, err: grpc.RpcError, request, attempt: int, metadata, api: str) -> bool:
        """Whether to send a failed call again: once with a renewed key when the token was
        refused; once more when the worker serving an idempotent call died (a request that
        kills its worker is thus sent twice at most)."""
        if attempt == 1 and token_refused(err):
            return self.renew_key(api, metadata)
        return (attempt == 1 and worker_died(err)
                and type(request).__name__ in IDEMPOTENT_REQUESTS)

    def _translate(self, err: grpc.RpcError, model: str, version: str,
                   deadline_s: float | None = None, attempts: int = 1) -> ServingError:
        return explain(err, target=f"{model} version {version}" if version else model,
                       deadline_s=deadline_s or self.deadline_s, key_file=self.key_file,
                       served=self._served, attempts=attempts)

    def _served(self) -> str:
        return ""


class DigitClient(_Base):
    """Calls one TorchServe over gRPC; reuse one instance for many calls (and threads)."""

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
        self.keys = Keys(key_file, token_api_url, timeout_s=deadline_s)
        self.deadline_s = deadline_s
        self.model_name = model_name
        self.inference_target, self.tls_cert = inference_target, tls_cert
        #: (model store, run directory) of a server started by the kit: ``register`` links a
        #: .mar archived after the start into the store TorchServe reads.
        self.stores: tuple[Path, Path] | None = None
        self.inference_channel = open_channel(inference_target, tls_cert)
        self.management_channel = open_channel(management_target, tls_cert)
        self.inference = inference_pb2_grpc.InferenceAPIsServiceStub(self.inference_channel)
        self.management = management_pb2_grpc.ManagementAPIsServiceStub(self.management_channel)

    @classmethod
    def for_run_dir(cls, run_dir: Path = RUN_DIR, **kwargs) -> DigitClient:
        """A client for the server started from ``run_dir`` (ports and key file from its record)."""
        record = _record(run_dir)
        client = cls(record.target("inference"), record.target("management"),
                     key_file=Path(record.key_file),
                     tls_cert=Path(record.tls_cert) if record.tls_cert else None,
                     token_api_url=record.token_api_url, **kwargs)
        client.stores = (Path(record.model_store), Path(run_dir))
        return client

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

    def predict_many(self, images: Sequence[bytes | str | Path], concurrency: int = 16,
                     version: str = "", progress: bool = True) -> list[Prediction | ServingError]:
        """Predict many images with at most ``concurrency`` calls in flight, in input order.

        A failed image gives its ``ServingError`` in its place instead of stopping the rest;
        nothing else is ever raised or returned for an image.
        """
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            results = pool.map(lambda image: _guarded(self.predict, image, version), images)
            return list(progress_bar(results, total=len(images), desc="gRPC predictions",
                                     disable=not progress))

    def stream(self, image: bytes | str | Path, version: str = "", model: str | None = None
               ) -> Iterator[dict]:
        """StreamPredictions: yields the answers of a server-streaming call (dicts).

        The kit's handler sends exactly one, the full answer: TorchServe 0.12.0 does not tell a
        worker whether a request came from Predictions or StreamPredictions, and a second answer
        to a unary call stops the model (see "Streaming" in handler.py). Streams that carry
        many answers are StreamPredictions2's, for sequence models (notebook 07).
        """
        request = self._prediction_request(image, version, model)
        try:
            for reply in self.inference.StreamPredictions(
                request, timeout=self.deadline_s, metadata=self.metadata("inference")
            ):
                answer = json.loads(reply.prediction)
                if "error" in answer:
                    raise InvalidInputError(str(answer["error"])[:500])
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
        """RegisterModel from the local model store (``mar`` is a file name in it).

        TorchServe sees only the store's ``.mar`` files (``runrecord.served_store``); one archived
        after the server started is linked in first. A path is refused here: TorchServe 0.12.0
        itself loads any directory given by its absolute path as an unpacked model, whatever
        ``allowed_urls`` says. URLs (``file://``, ``https://``) go to the server, which admits
        the model store's ``.mar`` files only.
        """
        if "://" not in mar and ("/" in mar or not mar.endswith(".mar")):
            raise ServingError(
                f"RegisterModel takes the file name of a .mar in the model store (e.g. "
                f"digit-model-v2.mar), not {mar!r}: make the archive with `digitserve archive` "
                "(or torch-model-archiver --export-path <model store>)."
            )
        if self.stores is not None:
            runrecord.link_archive(*self.stores, mar)
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
        except (ValueError, AttributeError):
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
    def _call(self, method, request, api: str, model: str = "", version: str = "",
              deadline_s: float | None = None):
        """One unary call with deadline and token, sent again once at most (see ``_retry``).

        Calls that wait for workers to start (register, scale) get at least WORKER_DEADLINE_S.
        """
        timeout = max(self.deadline_s, deadline_s or 0)
        for attempt in (1, 2):
            metadata = self.metadata(api)
            try:
                return method(request, timeout=timeout, metadata=metadata)
            except grpc.RpcError as err:
                if self._retry(err, request, attempt, metadata, api):
                    continue
                raise self._translate(err, model, version, timeout, attempt) from None

    def _served(self) -> str:
        try:
            served = [f"{m['modelName']}" for m in self.list_models()]
        except ServingError:
            return ""
        return f"Served models: {', '.join(served) or 'none'}."


class AsyncDigitClient(_Base):
    """The ``grpc.aio`` flavour of ``DigitClient.predict``, for asyncio code and notebooks.

    It shares the blocking client's keys (one renewal at a time for both), request checks,
    retry rule and error messages.
    """

    def __init__(self, client: DigitClient, inference_target: str | None = None,
                 tls_cert: Path | None = None) -> None:
        self.client = client
        self.keys, self.deadline_s = client.keys, client.deadline_s
        self.model_name = client.model_name
        self.channel = open_channel(inference_target or client.inference_target,
                                    tls_cert or client.tls_cert, aio=True)
        self.inference = inference_pb2_grpc.InferenceAPIsServiceStub(self.channel)

    @classmethod
    def for_run_dir(cls, run_dir: Path = RUN_DIR, **kwargs) -> AsyncDigitClient:
        return cls(DigitClient.for_run_dir(run_dir, **kwargs))

    async def predict(self, image: bytes | str | Path, version: str = "",
                      model: str | None = None) -> Prediction:
        """Classify one image; same errors as ``DigitClient.predict``."""
        request = self._prediction_request(image, version, model)
        for attempt in (1, 2):
            metadata = self.metadata("inference")
            try:
                reply = await self.inference.Predictions(
                    request, timeout=self.deadline_s, metadata=metadata
                )
                return Prediction.from_json(reply.prediction)
            except grpc.aio.AioRpcError as err:
                # A renewal blocks (HTTP, a lock shared with other callers): not on the loop.
                if await asyncio.to_thread(self._retry, err, request, attempt, metadata,
                                           "inference"):
                    continue
                raise self._translate(err, model or self.model_name, version,
                                      attempts=attempt) from None

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
                except Exception as err:  # noqa: BLE001 - every image gets a ServingError
                    return _unexpected(err)
                finally:
                    bar.update()

        try:
            return list(await asyncio.gather(*(one(image) for image in images)))
        finally:
            bar.close()

    async def close(self) -> None:
        await self.channel.close()
        self.client.close()


def _record(run_dir: Path) -> runrecord.RunRecord:
    try:
        record = runrecord.read(run_dir)
    except runrecord.RunRecordError as err:
        raise ServerUnavailableError(f"{err} Run `digitserve serve start` again.") from None
    if record is None:
        raise ServerUnavailableError(
            f"no TorchServe was started from {run_dir}: run `digitserve serve start` "
            "(or notebook 03) first."
        )
    return record


def _guarded(predict, image: bytes | str | Path, version: str) -> Prediction | ServingError:
    try:
        return predict(image, version=version)
    except ServingError as err:
        return err
    except Exception as err:  # noqa: BLE001 - predict_many returns a ServingError per image
        return _unexpected(err)


def _unexpected(err: Exception) -> ServingError:
    return ServingError(f"unexpected {type(err).__name__}: {str(err)[:200]}")
