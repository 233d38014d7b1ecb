"""Which gRPC calls the kit's client retries, on which failures, and how.

Only idempotent predictions are retried (``IDEMPOTENT_METHODS``): asking for the same
prediction twice gives the same answer and changes nothing on the server. Management calls
(register, scale, unregister) and streams are never retried. Two mechanisms, for two kinds of
failure:

1. **gRPC's own retry policy** (``service_config()``, a channel option): the channel retries a
   call that failed before the server sent anything, on
   ``UNAVAILABLE`` (TorchServe while its workers restart; any server not listening yet) and
   ``RESOURCE_EXHAUSTED`` (TorchServe's "Worker died." for a request whose worker was killed;
   oversized requests are refused by the client before sending, so never come back so).
2. **A client interceptor** (``ReplicaDeathRetry``, ``AsyncReplicaDeathRetry``) for Ray Serve:
   a call caught in the death of the replica handling it fails with ``INTERNAL`` "The actor
   died unexpectedly". gRPC's policy cannot retry it: Serve's proxy answers with headers and an
   empty message before the status, which commits the call. The interceptor retries exactly
   that failure (code *and* message), so a handler's deterministic ``INTERNAL`` is never
   repeated; Serve has marked the replica dead by then, and the retry goes to a live one.

Both wait about 0.2, 0.4 and 0.8 s between at most four attempts.
"""

from __future__ import annotations

import asyncio
import json
import time

import grpc

from digitserve.config import OIP_SERVICES

#: TorchServe's own inference API, which the Ray Serve cluster serves too.
INFERENCE_SERVICE = "org.pytorch.serve.grpc.inference.InferenceAPIsService"
#: (service, method) of every call that may be retried: idempotent predictions only.
IDEMPOTENT_METHODS = (
    (INFERENCE_SERVICE, "Predictions"),
    *((service, "ModelInfer") for service in OIP_SERVICES),
)
IDEMPOTENT_PATHS = frozenset(f"/{service}/{method}" for service, method in IDEMPOTENT_METHODS)
RETRYABLE_CODES = ("UNAVAILABLE", "RESOURCE_EXHAUSTED")
MAX_ATTEMPTS = 4
BACKOFF_S = (0.2, 0.4, 0.8)
RETRY_POLICY = {
    "maxAttempts": MAX_ATTEMPTS,
    "initialBackoff": f"{BACKOFF_S[0]}s",
    "maxBackoff": "2s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": list(RETRYABLE_CODES),
}
#: What Ray Serve's proxy says of a call whose replica died under it (with code INTERNAL).
REPLICA_DIED = "actor died unexpectedly"


def service_config() -> str:
    """The JSON for a channel's ``grpc.service_config`` option: retry idempotent predictions."""
    names = [{"service": service, "method": method} for service, method in IDEMPOTENT_METHODS]
    return json.dumps({"methodConfig": [{"name": names, "retryPolicy": RETRY_POLICY}]})


def replica_died(call) -> bool:
    """True for a finished call (or ``grpc.RpcError``) that failed because its replica died."""
    try:
        return (call.code() == grpc.StatusCode.INTERNAL
                and REPLICA_DIED in (call.details() or "").lower())
    except (AttributeError, grpc.RpcError):
        return False


def _method(details) -> str:
    method = details.method
    return method.decode() if isinstance(method, bytes) else method


class ReplicaDeathRetry(grpc.UnaryUnaryClientInterceptor):
    """Retries an idempotent prediction whose replica died: ``grpc.intercept_channel(channel,
    ReplicaDeathRetry())``."""

    def intercept_unary_unary(self, continuation, client_call_details, request):
        retryable = _method(client_call_details) in IDEMPOTENT_PATHS
        for attempt in range(MAX_ATTEMPTS):
            outcome = continuation(client_call_details, request)
            if not retryable or attempt == MAX_ATTEMPTS - 1 or not replica_died(outcome):
                return outcome
            time.sleep(BACKOFF_S[min(attempt, len(BACKOFF_S) - 1)])
        return outcome


class AsyncReplicaDeathRetry(grpc.aio.UnaryUnaryClientInterceptor):
    """The same for ``grpc.aio`` channels (``interceptors=[AsyncReplicaDeathRetry()]``)."""

    async def intercept_unary_unary(self, continuation, client_call_details, request):
        retryable = _method(client_call_details) in IDEMPOTENT_PATHS
        for attempt in range(MAX_ATTEMPTS):
            call = await continuation(client_call_details, request)
            try:
                await call
                return call
            except grpc.aio.AioRpcError as err:
                if not retryable or attempt == MAX_ATTEMPTS - 1 or not replica_died(err):
                    return call
            await asyncio.sleep(BACKOFF_S[min(attempt, len(BACKOFF_S) - 1)])
        return call
