"""In-process predictions, confusion counts, and served predictions timed."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from digitserve.config import WEIGHTS_PATH
from digitserve.model import DigitCNN
from digitserve.preprocessing import to_model_input

if TYPE_CHECKING:
    from digitserve.client import DigitClient, Prediction, ServingError


def load_model(weights_path: Path = WEIGHTS_PATH) -> DigitCNN:
    """Build DigitCNN with random weights, then load the trained state_dict (no download)."""
    model = DigitCNN()
    model.load_state_dict(torch.load(weights_path, map_location="cpu", weights_only=True))
    return model.eval()


@torch.inference_mode()
def predict_logits(
    model: torch.nn.Module,
    digits: torch.Tensor,
    batch_size: int = 500,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Logits (on the CPU) for uint8 digits (N, 28, 28) already normalised MNIST-style."""
    was_training = model.training
    model.eval()
    outputs = [
        model(to_model_input(chunk).to(device, memory_format=torch.channels_last)).float().cpu()
        for chunk in digits.split(batch_size)
    ]
    model.train(was_training)
    return torch.cat(outputs)


def confusion_counts(labels: torch.Tensor, predicted: torch.Tensor) -> torch.Tensor:
    """10×10 counts: row = true digit, column = predicted digit (``plots.confusion_matrix``
    draws them)."""
    return torch.bincount(labels * 10 + predicted, minlength=100).reshape(10, 10)


def timed_predictions(client: DigitClient, images: Sequence[bytes], version: str = "",
                      concurrency: int = 16) -> tuple[list[Prediction | ServingError], float]:
    """``client.predict_many`` without a progress bar, and the images answered per second."""
    started = time.perf_counter()
    answers = client.predict_many(images, concurrency=concurrency, version=version,
                                  progress=False)
    return answers, len(images) / (time.perf_counter() - started)
