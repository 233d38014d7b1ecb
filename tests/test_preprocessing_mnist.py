"""preprocessing on real MNIST: ``normalize_digit`` leaves MNIST's own digits almost unchanged."""

from __future__ import annotations

import numpy as np
import pytest

from digitserve.preprocessing import normalize_digit

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def digits(mnist_test) -> np.ndarray:
    """The first 1000 real MNIST test digits as uint8 (1000, 28, 28)."""
    return mnist_test[0][:1000].numpy()


def mean_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


def test_the_shipped_seven_is_mnist_test_image_0(seven, digits):
    assert np.array_equal(seven, digits[0])


# -- normalize_digit -------------------------------------------------------------------------
#: Largest mean pixel difference (0-255 scale) one digit may show after the best 1-pixel shift:
#: centring by centre of mass rounds to whole pixels, and the ink-level estimate moves a little.
PER_DIGIT_TOLERANCE = 12.0


def aligned_diff(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute pixel difference after the best shift of at most one pixel each way."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    return min(float(np.abs(np.roll(a, (dy, dx), axis=(0, 1)) - b).mean())
               for dy in (-1, 0, 1) for dx in (-1, 0, 1))


def test_normalize_digit_is_near_identity_on_mnist(digits):
    normalized = np.stack([normalize_digit(d) for d in digits])
    assert normalized.dtype == np.uint8 and normalized.shape == digits.shape
    assert mean_abs(normalized, digits) < 1.0  # under one grey level (1/255) on average
    per_digit = np.abs(normalized.astype(np.float64) - digits).mean(axis=(1, 2))
    assert np.quantile(per_digit, 0.9) < 1.0
    worst = max(aligned_diff(n, d) for n, d in zip(normalized, digits, strict=True))
    assert worst < PER_DIGIT_TOLERANCE


def test_normalize_digit_is_idempotent(digits):
    once = np.stack([normalize_digit(d) for d in digits[:300]])
    twice = np.stack([normalize_digit(d) for d in once])
    assert mean_abs(twice, once) < 0.2
    assert max(aligned_diff(t, o) for t, o in zip(twice, once, strict=True)) < PER_DIGIT_TOLERANCE


def test_dark_ink_on_light_ground_gives_the_same_digit(digits):
    for digit in digits[:300]:
        assert mean_abs(normalize_digit(255 - digit), normalize_digit(digit)) < 0.5


def test_off_centre_digit_on_a_large_white_canvas(digits):
    results, originals = [], []
    for digit in digits[:300]:
        canvas = np.full((150, 200), 255, dtype=np.uint8)
        canvas[100:128, 160:188] = 255 - digit  # bottom-right corner, dark ink
        results.append(normalize_digit(canvas))
        originals.append(normalize_digit(digit))
    assert mean_abs(np.stack(results), np.stack(originals)) < 1.0
    worst = max(aligned_diff(r, o) for r, o in zip(results, originals, strict=True))
    assert worst < PER_DIGIT_TOLERANCE


