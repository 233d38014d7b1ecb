"""data: the MNIST under data/ is the official one, and sample PNGs are faithful copies."""

from __future__ import annotations

import hashlib
import re

import numpy as np
import pytest
import torch
from PIL import Image

from digitserve import data

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("name", sorted(data.RAW_FILES))
def test_raw_files_have_the_recorded_sha256(name):
    path = data.raw_dir() / name
    assert hashlib.sha256(path.read_bytes()).hexdigest() == data.RAW_FILES[name]


def test_verify_mnist_passes_on_the_checkout_data():
    data.verify_mnist()


def test_split_sizes_and_label_counts():
    for train, counts, size in ((True, data.TRAIN_LABEL_COUNTS, 60_000),
                                (False, data.TEST_LABEL_COUNTS, 10_000)):
        images, labels = data.load_split(train=train)
        assert images.shape == (size, 28, 28) and images.dtype == torch.uint8
        assert labels.shape == (size,)
        assert sum(counts) == size
        assert tuple(torch.bincount(labels, minlength=10).tolist()) == counts


def test_verify_mnist_rejects_a_doctored_copy(tmp_path):
    """verify_mnist really looks at the labels: one changed label makes it fail."""
    raw = data.raw_dir(tmp_path)
    raw.mkdir(parents=True)
    for name in data.RAW_FILES:
        (raw / name).symlink_to(data.raw_dir() / name)
    labels = raw / "t10k-labels-idx1-ubyte"
    blob = bytearray(labels.read_bytes())
    blob[8] = (blob[8] + 1) % 10  # the first label, after the 8-byte IDX header
    labels.unlink()
    labels.write_bytes(bytes(blob))
    with pytest.raises(RuntimeError, match="test set .* is not the official one"):
        data.verify_mnist(tmp_path)


def test_export_samples_writes_the_test_images_with_their_labels(tmp_path, mnist_test):
    images, labels = mnist_test
    paths = data.export_samples(per_digit=3, out=tmp_path)
    assert len(paths) == 30
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths)
    for digit in range(10):
        first = torch.nonzero(labels == digit).flatten()[:3].tolist()
        mine = [p for p in paths if data.label_of(p) == digit]
        assert [int(re.match(r"test(\d{5})_label", p.name).group(1)) for p in mine] == first
    for path in paths:
        index = int(re.match(r"test(\d{5})_label(\d)\.png$", path.name).group(1))
        assert data.label_of(path) == int(labels[index])
        with Image.open(path) as image:
            assert image.format == "PNG" and image.mode == "L"
            assert np.array_equal(np.asarray(image), images[index].numpy())


def test_label_of_reads_the_digit_from_the_name(tmp_path):
    assert data.label_of(tmp_path / "test00042_label7.png") == 7
