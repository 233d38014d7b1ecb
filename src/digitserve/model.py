"""DigitCNN: the model TorchServe serves. This file is archived into the .mar as the model file.

TorchServe builds the model as ``DigitCNN()`` and requires exactly one class in this file;
``for_serving`` is how the handler (and the benchmark's floor) then prepares it.
"""

import warnings
from collections.abc import Iterable

import torch
from torch import nn
from torchvision.models import MobileNet_V3_Small_Weights, mobilenet_v3_small


class DigitCNN(nn.Module):
    """MobileNetV3-small backbone with a 576→1024→Hardswish→Dropout(0.5)→10 head.

    It returns logits: softmax belongs to the handler, cross-entropy to training.
    ImageNet weights are loaded only when asked for (``imagenet=True``, needs internet);
    the served model is always built with random weights and then loads its state_dict.
    """

    def __init__(self, imagenet: bool = False) -> None:
        super().__init__()
        weights = MobileNet_V3_Small_Weights.IMAGENET1K_V1 if imagenet else None
        backbone = mobilenet_v3_small(weights=weights)
        self.features = backbone.features
        self.pool = backbone.avgpool
        self.classifier = nn.Sequential(
            nn.Linear(576, 1024),
            nn.Hardswish(),
            nn.Dropout(p=0.5),
            nn.Linear(1024, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map a batch of 3×96×96 images to 10 digit logits."""
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def for_serving(model: nn.Module, image_size: int, device: torch.device | str = "cpu",
                batch_sizes: Iterable[int] = (1,)) -> torch.jit.ScriptModule:
    """The model as the handler runs it: channels_last, traced and frozen, warmed up.

    Frozen TorchScript halves the forward pass on a CPU here (notebook 07: 1.9 against 4.1 ms
    at batch 1): it drops Python's per-module overhead and folds BatchNorm into the
    convolutions, with the same answers (within 1e-6). TorchScript is deprecated in recent
    torch, which warns; the kit pins torch, and TorchServe 0.12 loads no newer format.
    """
    model = model.eval().to(device, memory_format=torch.channels_last)
    example = torch.zeros(1, 3, image_size, image_size, device=device).contiguous(
        memory_format=torch.channels_last)
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated")
        frozen = torch.jit.freeze(torch.jit.trace(model, example))
        for batch_size in sorted(set(batch_sizes)):
            batch = example.expand(batch_size, -1, -1, -1).contiguous(
                memory_format=torch.channels_last)
            for _ in range(2):  # the JIT profiles a shape's first run and optimises the second
                frozen(batch)
    return frozen
