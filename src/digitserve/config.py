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

# -- added for issue 15 (H5): the second version's weights, trained in notebook 01 ---------------
#: Version 2.0 of the model (augmented training, another seed), which notebook 06 serves.
WEIGHTS_V2_PATH = ARTIFACTS_DIR / "digitcnn-v2.pt"
