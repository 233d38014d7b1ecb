"""Every path, name, port and limit of the kit, defined once and imported everywhere else."""

from __future__ import annotations

import os
from dataclasses import astuple, dataclass
from pathlib import Path

#: The checkout the kit runs from; ``DIGITSERVE_HOME`` moves every artifact elsewhere.
PROJECT_ROOT = Path(os.environ.get("DIGITSERVE_HOME", Path(__file__).resolve().parents[2]))
DATA_DIR = PROJECT_ROOT / "data"
SAMPLES_DIR = DATA_DIR / "samples"
PROTOS_DIR = PROJECT_ROOT / "protos"
#: Tests (and several users on one host) point these elsewhere so they never clobber each other.
MODEL_STORE = Path(os.environ.get("DIGITSERVE_MODEL_STORE", PROJECT_ROOT / "model_store"))
BUILD_DIR = Path(os.environ.get("DIGITSERVE_BUILD_DIR", PROJECT_ROOT / "build"))
ARTIFACTS_DIR = BUILD_DIR / "artifacts"
FIGURES_DIR = BUILD_DIR / "figures"
METRICS_DIR = BUILD_DIR / "metrics"
NOTEBOOKS_OUT_DIR = BUILD_DIR / "notebooks"

WEIGHTS_PATH = ARTIFACTS_DIR / "digitcnn.pt"
TRAIN_METRICS_PATH = ARTIFACTS_DIR / "digitcnn.metrics.json"

MODEL_NAME = "digitmodel"
MODEL_VERSION = "1.0"
ARCHIVE_NAME = "digit-model"
#: The archive notebook 02 (``digitserve archive``) writes and every later lesson serves.
ARCHIVE_PATH = MODEL_STORE / f"{ARCHIVE_NAME}.mar"

#: The largest request TorchServe accepts and the largest message the client sends or receives.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
#: Deadline of every gRPC call, in seconds: no call waits for ever.
RPC_DEADLINE_S = 10.0
#: RegisterModel and ScaleWorker (synchronous) wait for new workers to load the model.
WORKER_DEADLINE_S = 120.0
#: How long ``serve start`` waits for the model to answer before giving up.
STARTUP_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Ports:
    """The five ports TorchServe listens on, all bound to 127.0.0.1."""

    grpc_inference: int = 7070
    grpc_management: int = 7071
    http_inference: int = 8080
    http_management: int = 8081
    metrics: int = 8082


#: ``DIGITSERVE_PORT_OFFSET`` shifts all five ports, e.g. by 100 × seat number in a workshop.
PORT_OFFSET = int(os.environ.get("DIGITSERVE_PORT_OFFSET", "0"))
DEFAULT_PORTS = Ports(*(port + PORT_OFFSET for port in astuple(Ports())))
HOST = "127.0.0.1"

#: TorchServe's working directory (config, logs, pid file, token key file): outside the checkout,
#: private to the user, one per port set so that several servers never share a key file.
RUN_DIR = Path(
    os.environ.get(
        "DIGITSERVE_RUN_DIR",
        Path.home() / ".cache" / "digitserve" / f"run-{DEFAULT_PORTS.grpc_inference}",
    )
)

# -- The second version's weights, trained in notebook 01 ------------------------------------
#: Version 2.0 of the model (augmented training, another seed), which notebook 06 serves.
WEIGHTS_V2_PATH = ARTIFACTS_DIR / "digitcnn-v2.pt"

# -- The server's own readiness and health probes ---------------------------------------------
#: Deadline of each readiness (DescribeModel) and health (Ping) probe of ``digitserve.server``.
PROBE_DEADLINE_S = 5.0

# -- The live-drawing model (notebook 07): a stateful twin of digitmodel ----------------------
#: Served beside digitmodel with TorchServe's sequence batching: it keeps one canvas per
#: sequence id and answers after every pen stroke sent over StreamPredictions2.
LIVE_MODEL_NAME = "digitlive"
LIVE_ARCHIVE_NAME = "digit-live"
LIVE_ARCHIVE_PATH = MODEL_STORE / f"{LIVE_ARCHIVE_NAME}.mar"
#: TorchServe's frontend polls the sequences with batchSize + 1 threads, one of them always
#: waiting for new sequences: at most batchSize sequences move at once. A sequence holds its
#: thread until its next request comes or it has been idle for sequenceMaxIdleMSec; a sequence
#: beyond batchSize waits for a thread that long (here: 1 s for the second drawing with a
#: batch size of 1). A batch size of 4 lets four drawings move together; a lone stroke then
#: waits up to the batch delay for company, so the delay is short.
LIVE_BATCH_SIZE = 4
LIVE_MAX_BATCH_DELAY_MS = 2
#: How long (ms) the frontend waits for a sequence's next request before it lets the sequence's
#: slot go. The handler's canvas outlives it: the next stroke with the same sequence id opens a
#: new slot and finds its canvas.
LIVE_SEQUENCE_MAX_IDLE_MS = 1000
#: Sequences the frontend tracks at once (more are refused), and strokes queued per sequence.
LIVE_MAX_SEQUENCES = 32
LIVE_MAX_QUEUED_STROKES = 16
#: Canvases the handler keeps (the least recently used goes first), and for how long one may
#: sit unused before it is dropped.
LIVE_MAX_CANVASES = 64
LIVE_CANVAS_IDLE_S = 1800
#: Deadline of one StreamPredictions2 call: a drawing session, person-paced.
LIVE_SESSION_DEADLINE_S = 1800.0

# -- Beyond one TorchServe: KServe and the Ray Serve cluster (notebook 09) ----------------------
#: The Open Inference Protocol's gRPC service under its two names: TorchServe 0.12 puts it in a
#: package of its own; KServe, Triton and the protocol's standard proto use ``inference``.
OIP_SERVICES = (
    "org.pytorch.serve.grpc.openinference.GRPCInferenceService",
    "inference.GRPCInferenceService",
)
#: The kit's other servers take their ports from one block, shifted by ``PORT_OFFSET`` like
#: TorchServe's. Its ports end in 00-69, so neither this block nor TorchServe's ports (ending in
#: 70, 71, 80, 81, 82) of any seat whose offset is a multiple of 100 ever meet another seat's.
PORT_BLOCK = 10_000 + PORT_OFFSET


@dataclass(frozen=True)
class KServePorts:
    """KServe's ModelServer defaults to 8080/8081, TorchServe's: the kit always passes both."""

    http: int = PORT_BLOCK
    grpc: int = PORT_BLOCK + 1

    @classmethod
    def at(cls, block: int) -> KServePorts:
        """The same layout from another first port (tests: a block found free)."""
        return cls(*(port - PORT_BLOCK + block for port in astuple(cls())))


@dataclass(frozen=True)
class ClusterPorts:
    """Every port of the two-node Ray cluster, explicit and distinct per node.

    Ray's defaults (6379, 8265, 10001, 52365, ...) collide with other users on a shared host,
    and two nodes on one machine would otherwise pick the same ones. ``head_*``: the head node;
    ``node_*``: the second node; ``*_workers``: the first of 20 ports for that node's workers.
    """

    serve_grpc: int = PORT_BLOCK + 2
    serve_http: int = PORT_BLOCK + 3
    gcs: int = PORT_BLOCK + 10
    client_server: int = PORT_BLOCK + 11
    head_node_manager: int = PORT_BLOCK + 12
    head_object_manager: int = PORT_BLOCK + 13
    head_runtime_env_agent: int = PORT_BLOCK + 14
    head_agent_grpc: int = PORT_BLOCK + 15
    head_agent_http: int = PORT_BLOCK + 16
    head_metrics: int = PORT_BLOCK + 17
    #: The dashboard is off, but Ray still claims its port for a minimal head process.
    head_dashboard: int = PORT_BLOCK + 18
    head_workers: int = PORT_BLOCK + 20
    node_node_manager: int = PORT_BLOCK + 42
    node_object_manager: int = PORT_BLOCK + 43
    node_runtime_env_agent: int = PORT_BLOCK + 44
    node_agent_grpc: int = PORT_BLOCK + 45
    node_agent_http: int = PORT_BLOCK + 46
    node_metrics: int = PORT_BLOCK + 47
    node_workers: int = PORT_BLOCK + 50

    #: How many worker ports each node gets (from ``*_workers``).
    WORKER_PORTS = 20

    @classmethod
    def at(cls, block: int) -> ClusterPorts:
        """The same layout from another first port (tests: a block found free)."""
        return cls(*(port - PORT_BLOCK + block for port in astuple(cls())))


#: Where ``digitserve kserve`` and ``digitserve cluster`` keep their state, logs and key file.
KSERVE_RUN_DIR = RUN_DIR.parent / f"{RUN_DIR.name}-kserve"
CLUSTER_RUN_DIR = RUN_DIR.parent / f"{RUN_DIR.name}-cluster"
