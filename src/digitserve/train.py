"""Train DigitCNN on MNIST: seeded, with a progress bar, on CUDA when present, else the CPU.

What makes the full lesson fit in a few minutes on a 2-core CPU (``channels_last``, fused
AdamW, a short one-cycle schedule with a high peak, ...) was measured: ``digitserve.levers``
holds the measurements and notebook 01 shows them.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn

from digitserve.config import DATA_DIR, TRAIN_METRICS_PATH, WEIGHTS_PATH, WEIGHTS_V2_PATH
from digitserve.data import load_normalized
from digitserve.evaluate import predict_logits
from digitserve.model import DigitCNN
from digitserve.preprocessing import IMAGE_SIZE, to_model_input
from digitserve.progress import progress


@dataclass(frozen=True)
class TrainSettings:
    """What a training run does; ``FULL``, ``QUICK`` and ``VERSION2`` below are the lesson's."""

    #: Passes over the training images; a fraction ends the last pass early (1.5: one and a half).
    epochs: float = 2
    batch_size: int = 128
    max_lr: float = 3e-3
    weight_decay: float = 0.05
    #: Each target keeps 1 - ε + ε/10 on the true digit (``target_ceiling`` computes it).
    label_smoothing: float = 0.1
    batchnorm_momentum: float = 0.1
    #: Training images over which BatchNorm statistics are recomputed before each evaluation.
    batchnorm_images: int = 4096
    #: Small random rotations, shifts and zooms of each training digit.
    augment: bool = True
    #: How strong they are: 1 is up to ±10°, ±8 % shift and ±10 % zoom (``augment``'s defaults).
    augment_strength: float = 1.0
    #: Train on only the first N training images (None: all 60,000); the quick setting uses this.
    train_limit: int | None = None
    #: Measure the 10,000 test images after every epoch (False: after the last one only).
    test_every_epoch: bool = True
    #: The side of the centred square of each 96×96 input that each share of the training
    #: steps sees, in order (``crop_at``). The border is mostly ground, at the same scale as the
    #: digit, so a smaller square costs less per step; evaluation always sees all 96×96.
    crops: tuple[tuple[int, float], ...] = ((IMAGE_SIZE, 1.0),)
    #: Torch threads while training (None: torch's default, one per core).
    threads: int | None = None
    seed: int = 0


#: The full lesson: notebook 01 at ``QUICK = False`` and ``digitserve train``. Chosen from the
#: measured runs (``digitserve.levers``): 1.6 passes with a high one-cycle peak, the test set
#: measured once, at the end.
FULL = TrainSettings(epochs=1.6, max_lr=1e-2, test_every_epoch=False)
#: The CI setting (``QUICK = True``, ``digitserve train --quick``): about a minute, ≥ 95 %.
QUICK = TrainSettings(epochs=1, train_limit=20_000, augment=False)
#: Version 2.0, which notebook 06 serves beside 1.0: the quick setting with augmentation and
#: another seed, trained in notebook 01 at both settings (it teaches versions, not accuracy).
VERSION2 = replace(QUICK, augment=True, seed=1)
#: How many batches one point of the training-loss curve averages.
CURVE_BATCHES = 25


def target_ceiling(label_smoothing: float, classes: int = 10) -> dict[str, float]:
    """What label smoothing asks of the model, and the lowest training loss it allows.

    The smoothed target of a digit puts ``1 - ε + ε/classes`` on its class and ``ε/classes`` on
    each other one. Cross-entropy against it is smallest when the model answers exactly that
    target, and that smallest value is the target's entropy: with ε = 0.1 and ten classes,
    0.91 and 0.01, and a loss that cannot go below 0.50. So the training loss levels off near
    0.5, and a model trained this way is about 91 % sure even of the digits it knows best.
    """
    true_class = 1 - label_smoothing + label_smoothing / classes
    other = label_smoothing / classes
    floor = -true_class * math.log(true_class)
    if other > 0:
        floor -= (classes - 1) * other * math.log(other)
    return {"true_class_probability": true_class, "other_class_probability": other,
            "lowest_loss": floor}


def crop_at(progress: float, crops: tuple[tuple[int, float], ...]) -> int:
    """The side of the centred square trained on at this point of the run (0 up to 1)."""
    reached = 0.0
    for side, share in crops:
        reached += share
        if progress < reached - 1e-9:
            return side
    return crops[-1][0]


def center_crop(inputs: torch.Tensor, side: int) -> torch.Tensor:
    """The centred ``side``×``side`` square of each (…, 96, 96) input (a view, no copy)."""
    margin = (IMAGE_SIZE - side) // 2
    return inputs[..., margin:margin + side, margin:margin + side]


def recalibrate_batchnorm(model: nn.Module, digits: torch.Tensor, device: torch.device,
                          batch_size: int = 256) -> None:
    """Recompute BatchNorm's running statistics with the final weights ("precise BN").

    During training they are a moving average over weights that kept changing; after a short
    run they lag so far behind that the model in eval mode answers one digit for everything.
    """
    batches = (to_model_input(chunk).to(device, memory_format=torch.channels_last)
               for chunk in digits.split(batch_size))
    torch.optim.swa_utils.update_bn(batches, model)


def augment(digits: torch.Tensor, degrees: float = 10, shift: float = 0.08, zoom: float = 0.1,
            generator: torch.Generator | None = None, strength: float = 1.0) -> torch.Tensor:
    """Give each uint8 digit (N, 28, 28) its own small rotation, shift and zoom.

    ``strength`` scales all three ranges.

    ``v2.RandomAffine`` draws one transform per call, so a batch would need a Python loop of
    one call per digit (slow on a small CPU); one ``affine_grid``/``grid_sample`` does them all.
    """
    n = len(digits)
    degrees, shift, zoom = degrees * strength, shift * strength, zoom * strength
    angle = torch.deg2rad((torch.rand(n, generator=generator) * 2 - 1) * degrees)
    scale = 1 + (torch.rand(n, generator=generator) * 2 - 1) * zoom
    # Grid coordinates span 2 per image side.
    offset = (torch.rand(n, 2, generator=generator) * 2 - 1) * shift * 2
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, offset[:, 0]], 1),
                         torch.stack([sin, cos, offset[:, 1]], 1)], 1)
    grid = nn.functional.affine_grid(theta, [n, 1, *digits.shape[1:]], align_corners=False)
    moved = nn.functional.grid_sample(digits[:, None].float(), grid, align_corners=False)
    return moved[:, 0].round().clamp(0, 255).to(torch.uint8)


def pick_device() -> torch.device:
    """CUDA when this machine has it, else the CPU: the model is small enough for either."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def new_model(settings: TrainSettings, device: torch.device) -> DigitCNN:
    """DigitCNN as training uses it: channels_last, BatchNorm that follows a short run."""
    model = DigitCNN().to(device).to(memory_format=torch.channels_last)
    # torchvision's MobileNetV3 tracks BatchNorm statistics with momentum 0.01, tuned for long
    # ImageNet runs; over a few epochs they would lag the weights and spoil evaluation.
    for layer in model.modules():
        if isinstance(layer, nn.BatchNorm2d):
            layer.momentum = settings.batchnorm_momentum
    return model


def new_optimizer(model: nn.Module, settings: TrainSettings) -> torch.optim.Optimizer:
    """AdamW, fused: one kernel for all parameters instead of a Python loop over them."""
    return torch.optim.AdamW(model.parameters(), lr=settings.max_lr,
                             weight_decay=settings.weight_decay, fused=True)


def train(
    settings: TrainSettings = FULL,
    weights_path: Path = WEIGHTS_PATH,
    metrics_path: Path = TRAIN_METRICS_PATH,
    data_root: Path = DATA_DIR,
) -> dict:
    """Train, evaluate on the 10,000 test images, save weights and metrics; return the metrics.

    The test set is only watched, never used to choose anything: the saved model is the last one.
    """
    torch.manual_seed(settings.seed)
    threads_before = torch.get_num_threads()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    device = pick_device()
    started, cpu_started = time.perf_counter(), time.process_time()
    load_before = os.getloadavg()[0]
    train_x, train_y = load_normalized(train=True, root=data_root)
    if settings.train_limit:
        train_x, train_y = train_x[: settings.train_limit], train_y[: settings.train_limit]
    test_x, test_y = load_normalized(train=False, root=data_root)

    model = new_model(settings, device)
    optimizer = new_optimizer(model, settings)
    steps_per_epoch = -(-len(train_x) // settings.batch_size)
    total_steps = round(settings.epochs * steps_per_epoch)
    passes = math.ceil(total_steps / steps_per_epoch)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=settings.max_lr, total_steps=total_steps
    )
    loss_fn = nn.CrossEntropyLoss(label_smoothing=settings.label_smoothing)
    generator = torch.Generator().manual_seed(settings.seed)
    history, curve = [], []
    test_seconds = 0.0
    for epoch in range(1, passes + 1):
        model.train()
        steps = min(steps_per_epoch, total_steps - (epoch - 1) * steps_per_epoch)
        order = torch.randperm(len(train_x), generator=generator)[: steps * settings.batch_size]
        seen = correct = 0
        loss_sum = 0.0
        window = [0.0, 0, 0]  # loss sum, correct, images over the last CURVE_BATCHES batches
        bar = progress(order.split(settings.batch_size), desc=f"epoch {epoch}/{passes}",
                       unit="batch")
        for step, batch in enumerate(bar, start=1):
            side = crop_at(((epoch - 1) * steps_per_epoch + step - 1) / total_steps,
                           settings.crops)
            digits = train_x[batch]
            if settings.augment:
                digits = augment(digits, generator=generator, strength=settings.augment_strength)
            inputs = center_crop(to_model_input(digits), side).to(
                device, memory_format=torch.channels_last)
            labels = train_y[batch].to(device)
            logits = model(inputs)
            loss = loss_fn(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            hits = (logits.argmax(1) == labels).sum().item()
            batch_loss = loss.item() * len(batch)
            seen, correct, loss_sum = seen + len(batch), correct + hits, loss_sum + batch_loss
            window = [window[0] + batch_loss, window[1] + hits, window[2] + len(batch)]
            if step % CURVE_BATCHES == 0 or step == steps:
                curve.append({"epoch": epoch - 1 + step / steps_per_epoch,
                              "train_loss": window[0] / window[2],
                              "train_accuracy": window[1] / window[2]})
                window = [0.0, 0, 0]
            # Shown at the bar's next refresh, not now: one refresh per batch would flood an
            # executed notebook with thousands of output lines.
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.4f}",
                            refresh=False)
        bar.close()
        reached = (epoch if steps == steps_per_epoch
                   else round(epoch - 1 + steps / steps_per_epoch, 3))
        row = {"epoch": reached, "train_loss": loss_sum / seen, "train_accuracy": correct / seen}
        if settings.test_every_epoch or epoch == passes:
            test_started = time.perf_counter()
            recalibrate_batchnorm(model, train_x[: settings.batchnorm_images], device)
            test_logits = predict_logits(model, test_x, device=device)
            row["test_loss"] = nn.functional.cross_entropy(test_logits, test_y).item()
            row["test_accuracy"] = (test_logits.argmax(1) == test_y).float().mean().item()
            test_seconds += time.perf_counter() - test_started
            print(f"epoch {epoch}: test accuracy {row['test_accuracy']:.4f}")
        history.append(row)

    weights_path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.cpu() for k, v in model.state_dict().items()}, weights_path)
    metrics = {
        "settings": asdict(settings),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "train_images": len(train_x),
        "epochs": history,
        "curve": curve,
        "target": target_ceiling(settings.label_smoothing),
        "test_accuracy": history[-1]["test_accuracy"],
        "wall_time_s": round(time.perf_counter() - started, 1),
        "cpu_time_s": round(time.process_time() - cpu_started, 1),
        "test_time_s": round(test_seconds, 1),
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "weights": str(weights_path),
    }
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    metrics_path.write_text(json.dumps(metrics, indent=2))
    torch.set_num_threads(threads_before)
    return metrics


def train_version2(settings: TrainSettings = VERSION2, weights_path: Path = WEIGHTS_V2_PATH
                   ) -> dict:
    """Train version 2.0 (notebook 06 serves it beside 1.0); its metrics go beside it."""
    return train(settings, weights_path=weights_path,
                 metrics_path=weights_path.with_suffix(".metrics.json"))


def require_version2(weights_path: Path = WEIGHTS_V2_PATH) -> Path:
    """Return version 2.0's weights, or raise the error that says how to make them."""
    if not Path(weights_path).is_file():
        raise FileNotFoundError(
            f"no version 2.0 weights at {weights_path}: run notebooks/01_train.ipynb "
            "(its section 4 trains version 2.0) first."
        )
    return Path(weights_path)
