"""The kit's gRPC channels and token keys, shared by every client and by the server's probe.

- One set of channel options: message sizes that match the server's ``max_request_size``,
  keepalive, no proxy (calls go to loopback only, never through ``http_proxy``/``grpc_proxy``),
  and one retry policy for the idempotent inference calls.
- ``Keys``: TorchServe's token keys from its ``key_file.json``, re-read when the file is being
  rewritten, and renewed over its HTTP token API one renewal at a time.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc

from digitserve.config import MAX_MESSAGE_BYTES, OIP_SERVICES
from digitserve.errors import AuthError, ServerUnavailableError

#: Idempotent inference RPCs that gRPC may send again: TorchServe's Predictions, and
#: ModelInfer of the Open Inference Protocol under both service names (TorchServe's own
#: package, and KServe's / Triton's ``inference``).
IDEMPOTENT_METHODS = (
    ("org.pytorch.serve.grpc.inference.InferenceAPIsService", "Predictions"),
    *((service, "ModelInfer") for service in OIP_SERVICES),
)
#: Request messages of those RPCs: the client retries a call carrying one of these once more
#: when the process serving it died (``errors.worker_died``).
IDEMPOTENT_REQUESTS = frozenset({"PredictionsRequest", "ModelInferRequest"})

#: gRPC retries only UNAVAILABLE (nothing listens yet, a connection reset, a busy queue), with
#: backoff, and stops retrying on a channel whose calls keep failing (retryThrottling: each
#: failure costs a token, each success earns 0.1; retries stop below half of the 10 tokens).
#: RESOURCE_EXHAUSTED is not retried here: TorchServe returns it when a worker dies under a
#: request, and a request that kills its worker must not be sent again and again; the client
#: sends such a request once more at most (``DigitClient``).
SERVICE_CONFIG = {
    "methodConfig": [{
        "name": [{"service": service, "method": method} for service, method in IDEMPOTENT_METHODS],
        "retryPolicy": {"maxAttempts": 4, "initialBackoff": "0.2s", "maxBackoff": "2s",
                        "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]},
    }],
    "retryThrottling": {"maxTokens": 10, "tokenRatio": 0.1},
}

#: Channel options shared by every channel the kit opens.
CHANNEL_OPTIONS = (
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    # The kit only ever calls loopback: an http_proxy/grpc_proxy set for the internet must not
    # route these calls (gRPC honours both by default).
    ("grpc.enable_http_proxy", 0),
    ("grpc.enable_retries", 1),
    ("grpc.service_config", json.dumps(SERVICE_CONFIG)),
)

#: How long a key file that TorchServe is rewriting may stay unreadable before giving up.
KEY_FILE_SETTLE_S = 2.0


def open_channel(target: str, tls_cert: Path | None = None, aio: bool = False):
    """A channel to ``target`` with the kit's options; TLS trusting ``tls_cert`` if given."""
    module = grpc.aio if aio else grpc
    if tls_cert is None:
        return module.insecure_channel(target, CHANNEL_OPTIONS)
    credentials = grpc.ssl_channel_credentials(root_certificates=Path(tls_cert).read_bytes())
    return module.secure_channel(target, credentials, CHANNEL_OPTIONS)


def read_key(key_file: Path, api: str, settle_s: float = KEY_FILE_SETTLE_S) -> str:
    """The ``inference``, ``management`` or ``API`` key from TorchServe's key file.

    TorchServe rewrites the file in place when it renews a key, so a read can catch it empty
    or half-written: it is read again until it parses (for up to ``settle_s``).
    """
    end = time.monotonic() + settle_s
    while True:
        try:
            return json.loads(Path(key_file).read_text())[api]["key"]
        except FileNotFoundError:
            raise ServerUnavailableError(
                f"no key file at {key_file}: is TorchServe running (`digitserve serve status`)?"
            ) from None
        except (ValueError, KeyError, TypeError) as err:
            if time.monotonic() > end:
                raise AuthError(f"the key file {key_file} stays unreadable ({err!r:.80}): "
                                "restart the server (`digitserve serve start`).") from None
            time.sleep(0.02)


#: urllib without proxies: the token API is on loopback.
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class Keys:
    """The token keys of one server, shared by all threads (and tasks) of one client.

    ``renew`` asks TorchServe for a new key when the one a call sent was refused, one renewal
    at a time: callers that were refused with the same old key wait for the renewal in
    progress and then use its key, instead of each renewing (and invalidating) the key again.
    """

    def __init__(self, key_file: Path | None, token_api_url: str | None = None,
                 timeout_s: float = 10.0) -> None:
        self.key_file = Path(key_file) if key_file else None
        self.token_api_url = token_api_url
        self.timeout_s = timeout_s
        self._renewing = threading.Lock()
        self.renewals = 0

    def metadata(self, api: str) -> tuple[tuple[str, str], ...]:
        """The ``authorization`` metadata for the ``inference`` or ``management`` API."""
        if self.key_file is None:
            return ()
        return (("authorization", f"Bearer {read_key(self.key_file, api)}"),)

    def renew(self, api: str, sent: tuple[tuple[str, str], ...]) -> bool:
        """Get a key other than the one ``sent``: re-read the key file, else ask TorchServe.

        True when there is a new key to try. TorchServe's keys expire (60 minutes by default,
        ``token_expiration_min``) and can only be renewed over its HTTP management API, with
        the ``API`` key from the same file.
        """
        if self.key_file is None or not self.key_file.is_file():
            return False
        with self._renewing:
            if self.metadata(api) != sent:  # renewed meanwhile, or the server restarted
                return True
            if not self.token_api_url:
                return False
            request = urllib.request.Request(
                f"{self.token_api_url}/token?type={api}", method="POST",
                headers={"Authorization": f"Bearer {read_key(self.key_file, 'API')}"},
            )
            try:
                with _NO_PROXY.open(request, timeout=self.timeout_s):
                    pass
            except (OSError, urllib.error.HTTPError):
                return False
            self.renewals += 1
            return self.metadata(api) != sent
