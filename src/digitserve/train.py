"""Train DigitCNN on MNIST: seeded, with a progress bar, on CUDA when present, else the CPU."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from digitserve.config import DATA_DIR, TRAIN_METRICS_PATH, WEIGHTS_PATH
from digitserve.data import load_normalized
from digitserve.evaluate import predict_logits
from digitserve.model import DigitCNN
from digitserve.preprocessing import to_model_input
from digitserve.progress import progress


@dataclass(frozen=True)
class TrainSettings:
    """What a training run does. The defaults are the full lesson (≥ 99.3 % test accuracy)."""

    epochs: int = 4
    batch_size: int = 128
    max_lr: float = 3e-3
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    batchnorm_momentum: float = 0.1
    #: Training images over which BatchNorm statistics are recomputed before each evaluation.
    batchnorm_images: int = 4096
    #: Small random rotations, shifts and zooms of each training digit (the second version).
    augment: bool = False
    #: Train on only the first N training images (None: all 60,000); the quick setting uses this.
    train_limit: int | None = None
    seed: int = 0


QUICK_SETTINGS = TrainSettings(epochs=1, train_limit=20_000)


def recalibrate_batchnorm(model: nn.Module, digits: torch.Tensor, device: torch.device,
                          batch_size: int = 256) -> None:
    """Recompute BatchNorm's running statistics with the final weights ("precise BN").

    During training they are a moving average over weights that kept changing; after a short
    run they lag so far behind that the model in eval mode answers one digit for everything.
    """
    batches = (to_model_input(chunk).to(device, memory_format=torch.channels_last)
               for chunk in digits.split(batch_size))
    torch.optim.swa_utils.update_bn(batches, model)


def augment(digits: torch.Tensor, degrees: float = 10, shift: float = 0.08, zoom: float = 0.1
            ) -> torch.Tensor:
    """Give each uint8 digit (N, 28, 28) its own small rotation, shift and zoom.

    ``v2.RandomAffine`` draws one transform per call, so a batch would need a Python loop of
    one call per digit (slow on a small CPU); one ``affine_grid``/``grid_sample`` does them all.
    """
    n = len(digits)
    angle = torch.deg2rad((torch.rand(n) * 2 - 1) * degrees)
    scale = 1 + (torch.rand(n) * 2 - 1) * zoom
    offset = (torch.rand(n, 2) * 2 - 1) * shift * 2  # grid coordinates span 2 per image side
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, offset[:, 0]], 1),
                         torch.stack([sin, cos, offset[:, 1]], 1)], 1)
    grid = nn.functional.affine_grid(theta, [n, 1, *digits.shape[1:]], align_corners=False)
    moved = nn.functional.grid_sample(digits[:, None].float(), grid, align_corners=False)
    return moved[:, 0].round().clamp(0, 255).to(torch.uint8)


def pick_device() -> torch.device:
    """CUDA when this machine has it, else the CPU: the model is small enough for either."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def train(
    settings: TrainSettings = TrainSettings(),
    weights_path: Path = WEIGHTS_PATH,
    metrics_path: Path = TRAIN_METRICS_PATH,
    data_root: Path = DATA_DIR,
) -> dict:
    """Train, evaluate on the 10,000 test images after each epoch, save weights and metrics.

    The test set is only watched, never used to choose anything: the saved model is the last one.
    """
    torch.manual_seed(settings.seed)
    device = pick_device()
    started = time.perf_counter()
    train_x, train_y = load_normalized(train=True, root=data_root)
    if settings.train_limit:
        train_x, train_y = train_x[: settings.train_limit], train_y[: settings.train_limit]
    test_x, test_y = load_normalized(train=False, root=data_root)

    model = DigitCNN().to(device).to(memory_format=torch.channels_last)
    # torchvision's MobileNetV3 tracks BatchNorm statistics with momentum 0.01, tuned for long
    # ImageNet runs; over a few epochs they would lag the weights and spoil evaluation.
    for layer in model.modules():
        if isinstance(layer, nn.BatchNorm2d):
            layer.momentum = settings.batchnorm_momentum
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=settings.max_lr, weight_decay=settings.weight_decay
    )
    steps_per_epoch = -(-len(train_x) // settings.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=settings.max_lr, total_steps=settings.epochs * steps_per_epoch
    )
    loss_fn = nn.CrossEntropyLoss(label_smoothing=settings.label_smoothing)
    generator = torch.Generator().manual_seed(settings.seed)
    history = []
    for epoch in range(1, settings.epochs + 1):
        model.train()
        order = torch.randperm(len(train_x), generator=generator)
        seen = correct = 0
        loss_sum = 0.0
        bar = progress(order.split(settings.batch_size), desc=f"epoch {epoch}/{settings.epochs}")
        for batch in bar:
            digits = train_x[batch]
            if settings.augment:
                digits = augment(digits)
            inputs = to_model_input(digits).to(device, memory_format=torch.channels_last)
            labels = train_y[batch].to(device)
            logits = model(inputs)
            loss = loss_fn(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            seen += len(batch)
            loss_sum += loss.item() * len(batch)
            correct += (logits.argmax(1) == labels).sum().item()
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.4f}")
        recalibrate_batchnorm(model, train_x[: settings.batchnorm_images], device)
        test_logits = predict_logits(model, test_x, device=device)
        history.append(
            {
                "epoch": epoch,
                "train_loss": loss_sum / seen,
                "train_accuracy": correct / seen,
                "test_loss": nn.functional.cross_entropy(test_logits, test_y).item(),
                "test_accuracy": (test_logits.argmax(1) == test_y).float().mean().item(),
            }
        )
        print(f"epoch {epoch}: test accuracy {history[-1]['test_accuracy']:.4f}")

    weights_path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.cpu() for k, v in model.state_dict().items()}, weights_path)
    metrics = {
        "settings": asdict(settings),
        "device": str(device),
        "train_images": len(train_x),
        "epochs": history,
        "test_accuracy": history[-1]["test_accuracy"],
        "wall_time_s": round(time.perf_counter() - started, 1),
        "weights": str(weights_path),
    }
    metrics_path.write_text(json.dumps(metrics, indent=2))
    return metrics
