"""What can go wrong in a call to TorchServe, as exceptions whose message says what to do.

``explain`` turns a ``grpc.RpcError`` into one of them; every client of the kit raises only
these (``ServingError`` and its subclasses).
"""

from __future__ import annotations

from collections.abc import Callable

import grpc

from digitserve.config import MAX_MESSAGE_BYTES

#: Details of a call whose worker process died under it: TorchServe's "Worker died." (its
#: Python worker, RESOURCE_EXHAUSTED or INTERNAL) and Ray Serve's replica death (INTERNAL).
WORKER_DEATH_MARKERS = ("worker died", "the actor died unexpectedly")
#: TorchServe's answer when a model's job queue is full or no worker is up (UNAVAILABLE, or
#: INTERNAL when a version is named).
NO_WORKER_MARKER = "has no worker to serve inference request"


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


class ServerBusyError(ServerUnavailableError):
    """The model's queue is full, or none of its workers is up right now."""


class WorkerDiedError(ServerUnavailableError):
    """The worker process handling the call died (and was retried once already)."""


class DeadlineError(ServingError):
    """The call took longer than its deadline."""


class RequestTooLargeError(ServingError):
    """The request is over the size limit the client and server share."""


def worker_died(err: grpc.RpcError) -> bool:
    """The call failed because the process serving it died (TorchServe worker, Ray replica)."""
    details = (err.details() or "").lower()
    return (err.code() in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INTERNAL)
            and any(marker in details for marker in WORKER_DEATH_MARKERS))


def token_refused(err: grpc.RpcError) -> bool:
    """PERMISSION_DENIED because of the token (not because the model API is off)."""
    return (err.code() == grpc.StatusCode.PERMISSION_DENIED
            and "model api" not in (err.details() or "").lower())


def explain(err: grpc.RpcError, *, target: str, deadline_s: float, key_file: object,
            served: Callable[[], str] = lambda: "", attempts: int = 1) -> ServingError:
    """The ``ServingError`` for a failed call to ``target`` (a model, maybe with its version).

    ``deadline_s`` is the deadline the call really had; ``served`` lists the served models
    (called only when the model was not found); ``attempts`` is how often it was sent.
    """
    error = _explain(err, target, deadline_s, key_file, served, attempts)
    error.code = err.code().name
    return error


def _explain(err: grpc.RpcError, target: str, deadline_s: float, key_file: object,
             served: Callable[[], str], attempts: int) -> ServingError:
    code = err.code()
    details = (err.details() or "").split("\n")[0][:300]
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
            f"TorchServe refused the token from {key_file} ({details}). The key may have "
            "expired or the server restarted: re-read it, or restart with `digitserve serve "
            "start`."
        )
    if NO_WORKER_MARKER in details.lower():
        return ServerBusyError(
            f"TorchServe has no free worker for {target} right now: its queue "
            "(job_queue_size) is full or its workers are (re)starting. Try again, send fewer "
            f"requests at once, or add workers (`digitserve scale 2`). ({details})"
        )
    if worker_died(err):
        times = "twice" if attempts == 2 else f"{attempts} times" if attempts > 2 else "once"
        return WorkerDiedError(
            f"the worker handling this request for {target} died ({details}); the request was "
            f"sent {times}. TorchServe restarts the worker; if it repeats, the request itself "
            "may kill it: see logs/model_log.log in the run directory."
        )
    if code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INTERNAL) and (
        "not found" in details.lower() or "version" in details.lower()
    ):
        return ModelNotFoundError(f"{target} is not served ({details}). {served()}".rstrip())
    if code == grpc.StatusCode.UNAVAILABLE:
        return ServerUnavailableError(
            f"TorchServe did not answer ({details}). Is it running? `digitserve serve status`"
        )
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineError(
            f"no answer from TorchServe within the call's deadline of {deadline_s:g} s "
            "(a busy machine or a long queue: give the client a longer deadline_s)."
        )
    if code in (grpc.StatusCode.CANCELLED, grpc.StatusCode.RESOURCE_EXHAUSTED):
        return RequestTooLargeError(
            f"{code.name}: {details or 'the message is over a size limit'}; the limit is "
            f"{MAX_MESSAGE_BYTES:,} bytes (config.MAX_MESSAGE_BYTES)."
        )
    return ServingError(f"{code.name}: {details}")


class ServerError(RuntimeError):
    """TorchServe could not be started, reached or stopped; the message says what to do."""


class PortsInUseError(ServerError):
    """Another process listens on a port the server needs."""
