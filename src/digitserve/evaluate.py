"""In-process predictions and the figures a learner looks at after training."""

from __future__ import annotations

from pathlib import Path

import torch

from digitserve.config import WEIGHTS_PATH
from digitserve.model import DigitCNN
from digitserve.preprocessing import to_model_input


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


def confusion_matrix(labels: torch.Tensor, predicted: torch.Tensor) -> torch.Tensor:
    """10×10 counts: row = true digit, column = predicted digit."""
    return torch.bincount(labels * 10 + predicted, minlength=100).reshape(10, 10)
