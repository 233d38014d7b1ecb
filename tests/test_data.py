"""data: the MNIST under data/ is the official one, and sample PNGs are faithful copies."""

from __future__ import annotations

import hashlib
import re

import numpy as np
import pytest
import torch
from PIL import Image

from digitserve import data

#: Real MNIST under data/ (fetched once by the ``mnist`` fixture): the integration tier.
pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("mnist")]


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


def test_typical_test_digits_are_the_closest_to_their_digits_average(mnist_test):
    images, labels = mnist_test
    train_images, train_labels = data.load_split(train=True)
    chosen = data.typical_test_digits(per_digit=2)
    assert len(chosen) == 20
    assert [int(labels[i]) for i in chosen] == [d for d in range(10) for _ in range(2)]
    for digit in range(10):
        average = train_images[train_labels == digit].float().mean(dim=0)
        distance = (images.float() - average).square().sum(dim=(1, 2))
        mine = [i for i in chosen if labels[i] == digit]
        not_chosen = labels == digit
        not_chosen[mine] = False
        assert distance[mine].max() <= distance[not_chosen].min()
    assert 18 not in chosen  # the first test 3, whose closed top loop makes it look like an 8


def test_export_samples_writes_the_test_images_with_their_labels(tmp_path, mnist_test):
    images, labels = mnist_test
    paths = data.export_samples(per_digit=3, out=tmp_path)
    assert len(paths) == 30
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths)
    assert [int(re.match(r"test(\d{5})_label", p.name).group(1)) for p in paths] == (
        data.typical_test_digits(per_digit=3))
    for path in paths:
        index = int(re.match(r"test(\d{5})_label(\d)\.png$", path.name).group(1))
        assert data.label_of(path) == int(labels[index])
        with Image.open(path) as image:
            assert image.format == "PNG" and image.mode == "L"
            assert np.array_equal(np.asarray(image), images[index].numpy())


def test_export_samples_removes_an_earlier_selection(tmp_path):
    data.export_samples(per_digit=3, out=tmp_path)
    (tmp_path / "notes.txt").write_text("not a sample")
    paths = data.export_samples(per_digit=1, out=tmp_path)
    assert sorted(p.name for p in tmp_path.glob("*.png")) == sorted(p.name for p in paths)
    assert (tmp_path / "notes.txt").is_file()


def test_label_of_reads_the_digit_from_the_name(tmp_path):
    assert data.label_of(tmp_path / "test00042_label7.png") == 7
