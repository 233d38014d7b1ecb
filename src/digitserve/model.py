"""DigitCNN: the model TorchServe serves. This file is archived into the .mar as the model file.

TorchServe builds the model as ``DigitCNN()`` and requires exactly one class in this file.
"""

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
