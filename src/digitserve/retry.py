"""Which gRPC calls the kit's channels retry on their own, and on which status codes.

gRPC retries a call inside the channel, before the caller sees an error, when the channel's
service config names the method and the status code is listed. Only idempotent inference calls
are named: asking for the same prediction twice gives the same answer and changes nothing on
the server. Management calls (register, scale, unregister) and streams are never retried.

The codes, and which server sends each:

- ``UNAVAILABLE``: TorchServe while its workers restart; any server not listening yet.
- ``RESOURCE_EXHAUSTED``: TorchServe's "Worker died." for a request whose worker was killed.
  (Oversized requests are refused by the client before sending, so they never come back so.)
- ``INTERNAL``: Ray Serve's gRPC proxy when the replica handling the call dies ("The actor died
  unexpectedly"): Serve starts a new replica, and the retry goes to a live one.

A retry policy matches status codes only, never messages, so a deterministic ``INTERNAL`` (a
handler's unforeseen error) is retried too: it reaches the caller after the last attempt, about
``1.4 s`` of backoff later, instead of at once. That is the price of not losing a prediction when
a replica dies; the methods stay limited to idempotent predictions so nothing else pays it.
"""

from __future__ import annotations

import json

from digitserve.config import OIP_SERVICES

#: TorchServe's own inference API, which the Ray Serve cluster serves too.
INFERENCE_SERVICE = "org.pytorch.serve.grpc.inference.InferenceAPIsService"
#: (service, method) of every call the channels may retry: idempotent predictions only.
IDEMPOTENT_METHODS = (
    (INFERENCE_SERVICE, "Predictions"),
    *((service, "ModelInfer") for service in OIP_SERVICES),
)
RETRYABLE_CODES = ("UNAVAILABLE", "RESOURCE_EXHAUSTED", "INTERNAL")
#: At most 3 retries, waiting about 0.2, 0.4 and 0.8 s (gRPC randomises each wait below these).
RETRY_POLICY = {
    "maxAttempts": 4,
    "initialBackoff": "0.2s",
    "maxBackoff": "2s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": list(RETRYABLE_CODES),
}


def service_config() -> str:
    """The JSON for a channel's ``grpc.service_config`` option: retry idempotent predictions."""
    names = [{"service": service, "method": method} for service, method in IDEMPOTENT_METHODS]
    return json.dumps({"methodConfig": [{"name": names, "retryPolicy": RETRY_POLICY}]})
