"""Package DigitCNN into ``model_store/digit-model.mar`` with torch-model-archiver.

The .mar is a zip: ``MAR-INF/MANIFEST.json`` (model name, version, handler), the model file
(``model.py``), the weights (state_dict), the handler and the preprocessing it imports.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from digitserve.config import (
    ARCHIVE_NAME,
    ARCHIVE_PATH,
    LIVE_ARCHIVE_NAME,
    LIVE_BATCH_SIZE,
    LIVE_CANVAS_IDLE_S,
    LIVE_MAX_BATCH_DELAY_MS,
    LIVE_MAX_CANVASES,
    LIVE_MAX_QUEUED_STROKES,
    LIVE_MAX_SEQUENCES,
    LIVE_MODEL_NAME,
    LIVE_SEQUENCE_MAX_IDLE_MS,
    MODEL_NAME,
    MODEL_STORE,
    MODEL_VERSION,
    PROJECT_ROOT,
    WEIGHTS_PATH,
)

PACKAGE_DIR = Path(__file__).resolve().parent
MODEL_FILE = PACKAGE_DIR / "model.py"
HANDLER_FILE = PACKAGE_DIR / "handler.py"
EXTRA_FILES = (PACKAGE_DIR / "preprocessing.py",)


def archiver_command(
    weights: Path = WEIGHTS_PATH,
    version: str = MODEL_VERSION,
    export_path: Path = MODEL_STORE,
    model_name: str = MODEL_NAME,
    archiver: str = "torch-model-archiver",
) -> list[str]:
    """The ``torch-model-archiver`` command line that builds ``<export_path>/<model_name>.mar``.

    ``build_archive`` runs exactly this; notebook 02 prints it for a learner to type.
    """
    return [archiver, "--model-name", model_name, "--version", version,
            "--model-file", str(MODEL_FILE), "--serialized-file", str(weights),
            "--handler", str(HANDLER_FILE),
            "--extra-files", ",".join(str(path) for path in EXTRA_FILES),
            "--export-path", str(export_path), "--force"]


def archiver_shell(weights: Path = WEIGHTS_PATH, version: str = MODEL_VERSION,
                   model_store: Path = MODEL_STORE, archive_name: str = ARCHIVE_NAME,
                   model_name: str = MODEL_NAME, cwd: Path = PROJECT_ROOT) -> str:
    """``archiver_command`` as a learner would type it in a shell from ``cwd``, then the rename
    ``build_archive`` does (the archiver names its output after ``--model-name``)."""
    def short(arg: str) -> str:
        parts = [Path(part) for part in arg.split(",")]
        if all(part.is_absolute() and part.is_relative_to(cwd) for part in parts):
            return ",".join(str(part.relative_to(cwd)) for part in parts)
        return arg

    args = [shlex.quote(short(arg)) for arg in archiver_command(weights, version, model_store,
                                                                 model_name)]
    lines = [" ".join(args[:5])] + [" ".join(args[i:i + 2]) for i in range(5, len(args) - 1, 2)]
    lines.append(args[-1])
    built = short(str(model_store / f"{model_name}.mar"))
    wanted = short(str(model_store / f"{archive_name}.mar"))
    rename = f"\nmv {built} {wanted}" if built != wanted else ""
    return " \\\n    ".join(lines) + rename


def build_archive(
    weights: Path = WEIGHTS_PATH,
    version: str = MODEL_VERSION,
    archive_name: str = ARCHIVE_NAME,
    model_store: Path = MODEL_STORE,
    model_name: str = MODEL_NAME,
) -> Path:
    """Run torch-model-archiver and return the path of the new ``<archive_name>.mar``."""
    if not Path(weights).is_file():
        raise FileNotFoundError(
            f"no trained weights at {weights}: run `digitserve train` (notebook 01) first."
        )
    model_store.mkdir(parents=True, exist_ok=True)
    archiver = str(Path(sys.executable).with_name("torch-model-archiver"))
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(archiver_command(weights, version, Path(tmp), model_name, archiver),
                       check=True, capture_output=True, text=True)
        target = model_store / f"{archive_name}.mar"
        shutil.move(Path(tmp) / f"{model_name}.mar", target)
    return target


def require(mar: Path = ARCHIVE_PATH) -> Path:
    """Return ``mar`` if it exists, else raise the error that says how to make it."""
    if not Path(mar).is_file():
        raise FileNotFoundError(
            f"no model archive at {mar}: run notebooks/02_archive.ipynb or `digitserve archive` "
            "first."
        )
    return Path(mar)


def describe_archive(mar: Path) -> dict:
    """The files inside a .mar and its manifest, for a learner to look at."""
    with zipfile.ZipFile(mar) as archive:
        return {
            "files": {info.filename: info.file_size for info in archive.infolist()},
            "manifest": json.loads(archive.read("MAR-INF/MANIFEST.json")),
        }


# -- the live-drawing model (notebook 07) -------------------------------------------------------
LIVE_HANDLER_FILE = PACKAGE_DIR / "live_handler.py"
LIVE_EXTRA_FILES = (HANDLER_FILE, PACKAGE_DIR / "preprocessing.py", PACKAGE_DIR / "strokes.py")


def live_model_config() -> dict:
    """The live model's ``model-config.yaml``: TorchServe's sequence batching, and the handler's
    canvas limits (its ``handler`` section)."""
    return {
        "minWorkers": 1,
        "maxWorkers": 1,
        "batchSize": LIVE_BATCH_SIZE,
        "maxBatchDelay": LIVE_MAX_BATCH_DELAY_MS,
        "sequenceBatching": True,
        # Sequence batching is off unless this is above 0 (and then every request of a sequence
        # goes to the same worker, in order).
        "sequenceMaxIdleMSec": LIVE_SEQUENCE_MAX_IDLE_MS,
        "maxNumSequence": LIVE_MAX_SEQUENCES,
        "maxSequenceJobQueueSize": LIVE_MAX_QUEUED_STROKES,
        "handler": {"max_canvases": LIVE_MAX_CANVASES, "canvas_idle_s": LIVE_CANVAS_IDLE_S},
    }


def build_live_archive(source_mar: Path = ARCHIVE_PATH, model_store: Path = MODEL_STORE,
                       archive_name: str = LIVE_ARCHIVE_NAME, model_name: str = LIVE_MODEL_NAME
                       ) -> Path:
    """Archive the live-drawing model with the weights and version of ``source_mar``.

    The same network and weights as digitmodel, with ``live_handler.py`` as the handler and
    ``live_model_config()`` as its model-config.yaml; returns ``<archive_name>.mar``.
    """
    import yaml

    manifest = describe_archive(require(source_mar))["manifest"]
    model_store = Path(model_store)
    model_store.mkdir(parents=True, exist_ok=True)
    archiver = Path(sys.executable).with_name("torch-model-archiver")
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / manifest["model"]["serializedFile"]
        with zipfile.ZipFile(source_mar) as source:
            weights.write_bytes(source.read(manifest["model"]["serializedFile"]))
        config_file = Path(tmp) / "model-config.yaml"
        config_file.write_text(yaml.safe_dump(live_model_config(), sort_keys=False))
        out = Path(tmp) / "out"
        out.mkdir()
        subprocess.run(
            [str(archiver), "--model-name", model_name,
             "--version", manifest["model"]["modelVersion"],
             "--model-file", str(MODEL_FILE), "--serialized-file", str(weights),
             "--handler", str(LIVE_HANDLER_FILE),
             "--extra-files", ",".join(str(path) for path in LIVE_EXTRA_FILES),
             "--config-file", str(config_file), "--export-path", str(out), "--force"],
            check=True, capture_output=True, text=True,
        )
        target = model_store / f"{archive_name}.mar"
        shutil.move(out / f"{model_name}.mar", target)
    return target


def require_live(source_mar: Path = ARCHIVE_PATH, model_store: Path = MODEL_STORE) -> Path:
    """The live-drawing archive, built from ``source_mar`` when missing or older than it."""
    source = require(source_mar)
    target = Path(model_store) / f"{LIVE_ARCHIVE_NAME}.mar"
    if not target.is_file() or target.stat().st_mtime < source.stat().st_mtime:
        build_live_archive(source, model_store)
    return target
