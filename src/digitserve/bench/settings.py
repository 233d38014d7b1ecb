"""How much the benchmark measures, and the TorchServe configurations it starts.

``FULL_BENCH`` gives the figures to report (about 4 minutes of measuring on an idle 2-core
machine), ``QUICK_BENCH`` touches every path with small counts (CI). Each server the benchmark
starts is a ``ServerConfig``; ``server_settings`` turns one into the kit's ``ServerSettings``
(logging, JVM flags and environment through ``ServerSettings``' own fields, never by editing
``config.properties`` after the fact).
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from digitserve import config, oip
from digitserve.server import ModelSpec, ServerSettings, free_ports
from digitserve.tls import Certificate

BENCH_DIR = config.BUILD_DIR / "bench"
#: Two figures within this fraction of each other are a tie: runs of the same benchmark on the
#: same machine moved by about this much (README, "What it measured here").
TIE_TOLERANCE = 0.10
#: The deadline of every call made to measure speed (gRPC and REST): far longer than the kit's
#: ``RPC_DEADLINE_S``, so that 256 calls queued on a slow, busy machine give slow figures
#: rather than errors. The deadline situation sets its own, short one.
CALL_DEADLINE_S = 60.0
#: TorchServe queues at most ``job_queue_size`` requests per model (default 100) and refuses
#: the rest: the benchmark keeps up to 256 in flight, so its servers queue more.
JOB_QUEUE_SIZE = 1024
#: The logging set-ups a ``ServerConfig`` can name; "quiet" and "lean" are log4j2 files shipped
#: in this package (``log4j2/quiet.xml``, ``log4j2/lean.xml``).
LOGGING = ("default", "quiet", "lean", "async", "prometheus")


def log4j2_file(name: str) -> Path:
    """The path of one of the log4j2 configurations shipped with the package."""
    path = resources.files("digitserve.bench") / "log4j2" / f"{name}.xml"
    if not path.is_file():
        raise FileNotFoundError(f"no log4j2 configuration {name!r} in digitserve.bench: "
                                "reinstall the kit (`make env`)")
    return Path(str(path))


@dataclass(frozen=True)
class ServerConfig:
    """One TorchServe to start fresh: workers, batching, torch threads, logging, TLS."""

    label: str
    workers: int = 1
    batch_size: int = 1
    max_batch_delay_ms: int = 5
    #: Torch (OpenMP) threads per worker (the kit's default is one).
    torch_threads: int = ServerSettings.torch_threads
    #: One of ``LOGGING``: "default" is TorchServe's own log4j2.xml (the per-request lines the
    #: time breakdown reads), "quiet"/"lean" the shipped files ("lean" with
    #: ``metrics_mode=prometheus``), "async" ``async_logging=true``, "prometheus"
    #: ``metrics_mode=prometheus`` alone.
    logging: str = "default"
    #: Extra environment for TorchServe and its workers, e.g. (("OMP_WAIT_POLICY", "PASSIVE"),).
    environment: tuple[tuple[str, str], ...] = ()
    #: gRPC and REST over TLS (a self-signed RSA certificate) instead of plaintext.
    tls: bool = False
    #: Also serve the Open Inference Protocol on the gRPC inference port.
    oip: bool = False

    @property
    def slug(self) -> str:
        """A short unique name, used for the server's run directory."""
        extra = "".join(f"-{key.lower()}={value.lower()}" for key, value in self.environment)
        return (f"w{self.workers}-b{self.batch_size}-d{self.max_batch_delay_ms}-"
                f"t{self.torch_threads}-{self.logging}{extra}"
                f"{'-tls' if self.tls else ''}{'-oip' if self.oip else ''}")


def server_settings(server: ServerConfig, run_dir: Path, model_store: Path,
                    certificate: Certificate | None = None) -> ServerSettings:
    """The kit's ``ServerSettings`` for one configuration, on free ports, in ``run_dir``."""
    if server.logging not in LOGGING:
        raise ValueError(f"logging is one of {', '.join(LOGGING)}, not {server.logging!r}")
    ports = free_ports()
    properties = {"job_queue_size": str(JOB_QUEUE_SIZE)}
    if server.logging in ("lean", "prometheus"):
        properties["metrics_mode"] = "prometheus"
    if server.logging == "async":
        properties["async_logging"] = "true"
    if server.oip:
        properties.update(oip.OIP_PROPERTIES)
    if server.tls:
        if certificate is None:
            raise ValueError(f"{server.label}: TLS needs a certificate (rsa_certificate)")
        # TorchServe serves REST over TLS when its address says https, with the same
        # certificate_file/private_key_file as gRPC (ServerSettings.tls sets those).
        properties["inference_address"] = f"https://{config.HOST}:{ports.http_inference}"
    spec = ModelSpec(workers=server.workers, batch_size=server.batch_size,
                     max_batch_delay_ms=server.max_batch_delay_ms)
    log4j2 = log4j2_file(server.logging) if server.logging in ("quiet", "lean") else None
    return ServerSettings(ports=ports, run_dir=Path(run_dir), model_store=Path(model_store),
                          models=(spec,), torch_threads=server.torch_threads,
                          tls=certificate if server.tls else None,
                          extra_properties=properties, log4j2_config=log4j2,
                          environment=dict(server.environment))


def rsa_certificate(directory: Path, days: int = 2) -> Certificate:
    """A self-signed RSA certificate for 127.0.0.1, for gRPC *and* REST over TLS.

    TorchServe 0.12.0 reads the REST listener's private key as RSA only (an EC key, which
    ``digitserve.tls.make_self_signed`` makes and gRPC accepts, stops the server with
    "Invalid RSA private key"), so the benchmark makes its own.
    """
    directory.mkdir(parents=True, exist_ok=True)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(config.HOST))]),
            critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    paths = Certificate(directory / "server.crt", directory / "server.key")
    paths.cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    paths.key.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                            serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption()))
    paths.key.chmod(0o600)
    return paths


#: The server most situations run on: one worker, batching off, so that a call's time is one
#: request's (and the time breakdown can read TorchServe's per-request log lines).
SITUATION_SERVER = ServerConfig("batching off, 1 worker", oip=True)
#: The server under load: two workers, batches of up to 8 gathered within 5 ms.
LOAD_SERVER = ServerConfig("batching on (8 within 5 ms), 2 workers", workers=2, batch_size=8)
#: The same as SITUATION_SERVER, over TLS.
TLS_SERVER = ServerConfig("batching off, 1 worker, TLS", tls=True)


@dataclass(frozen=True)
class BenchSettings:
    """How much to measure. ``FULL_BENCH`` for figures you report, ``QUICK_BENCH`` for CI."""

    #: The main servers, each measured over gRPC and REST at every ``concurrencies``.
    main: tuple[ServerConfig, ...] = (SITUATION_SERVER, LOAD_SERVER)
    #: Where "many callers" runs (a main server: it is not started twice in a row).
    load_server: ServerConfig = LOAD_SERVER
    #: Timed calls per main measurement, untimed warm-up calls before each.
    requests: int = 200
    warmup: int = 20
    #: Untimed calls of each protocol sent to every new server first: the Java frontend
    #: compiles its hot paths (JIT) only after many calls, and the first one measured would pay.
    server_warmup: int = 300
    concurrencies: tuple[int, ...] = (1, 16)
    #: Distinct MNIST test digits cycled through.
    images: int = 256
    #: Timed images of the in-process floor at batch 1 (batch ``batch_size`` uses as many).
    floor_requests: int = 300
    batch_size: int = 8
    #: Connection reuse (one caller): calls per way of connecting.
    reuse_requests: int = 150
    #: Many callers: calls in flight, and calls per protocol and level.
    in_flight: tuple[int, ...] = (64, 256)
    load_requests: int = 1000
    #: Deadlines: calls sent at once with ``deadline_ms``, to a server that waits
    #: ``deadline_batch_delay_ms`` to fill a batch of ``batch_size``.
    deadline_ms: int = 100
    deadline_batch_delay_ms: int = 300
    #: Payload: the digit's PNG padded to these sizes (bytes), calls per size and protocol.
    payload_sizes: tuple[int, ...] = (10_000, 100_000, 1_000_000)
    payload_requests: int = 60
    #: Encoding: typed OIP tensor (gRPC) against a JSON pixel list (REST), calls each.
    encoding_requests: int = 150
    #: The worst-case request (digitserve.worst_case): calls per case; the QUICK setting
    #: measures it in-process only.
    worst_case_repeats: int = 1
    #: Lever servers (workers × threads, quiet logging), calls each; ``extended_levers`` adds
    #: OMP_WAIT_POLICY=PASSIVE and a second logging set-up (``levers.lever_servers``).
    server_levers: bool = True
    extended_levers: bool = False
    lever_requests: int = 120
    #: In-process levers (inference_mode, channels_last, TorchScript; torch.compile optional:
    #: it costs tens of seconds to compile here).
    model_levers: bool = True
    lever_iterations: int = 100
    compile_lever: bool = False
    quick: bool = False
    #: Where the results go.
    out_dir: Path = field(default=BENCH_DIR, compare=False)


FULL_BENCH = BenchSettings()
QUICK_BENCH = BenchSettings(
    main=(SITUATION_SERVER,), load_server=SITUATION_SERVER, requests=24, warmup=4,
    server_warmup=24, concurrencies=(1, 8), images=32, floor_requests=32, reuse_requests=16,
    in_flight=(64,), load_requests=128, payload_sizes=(100_000,), payload_requests=6,
    encoding_requests=12, server_levers=False, lever_iterations=8, quick=True,
)
