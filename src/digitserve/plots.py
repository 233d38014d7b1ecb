"""The figures a learner looks at: the data, what preprocessing does, training and its mistakes.

Every function builds a ``matplotlib.figure.Figure`` directly (no pyplot), so it works under any
backend, head-less included, and leaks no global figure state. In a notebook run
``%matplotlib inline`` once and a returned figure shows as the cell's result; ``save_to`` also
writes it as a PNG.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from IPython.display import Markdown
from matplotlib.axes import Axes
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from PIL import Image

from digitserve import preprocessing

if TYPE_CHECKING:
    from digitserve.client import Prediction

WRONG_COLOR = "tab:red"
#: The width, in inches, a grid cell takes: big enough for a 28×28 digit and a two-line title.
CELL_INCHES = 1.25


def sample_digits(
    images: torch.Tensor, labels: Sequence[int], columns: int = 10, title: str = "",
    save_to: Path | None = None,
) -> Figure:
    """A grid of digits with their labels: what the model learns from, as it is stored."""
    fig, axes = _grid(len(images), columns)
    for ax, image, label in zip(axes, images, labels, strict=True):
        _show_digit(ax, image)
        ax.set_title(str(int(label)), fontsize=10)
    fig.suptitle(title or f"{len(images)} MNIST digits and their labels")
    return save_figure(fig, save_to)


def preprocessing_steps(images: Sequence[torch.Tensor], save_to: Path | None = None) -> Figure:
    """Each grey image at every stage of the kit's preprocessing: what the model is really given.

    Columns: the image as given; ``normalize_digit``'s MNIST-style 28×28 digit; one channel of
    ``to_model_input``'s 3×96×96 tensor (the three are equal: MobileNet expects colour).
    """
    fig = Figure(figsize=(9.5, 3.3 * len(images)), layout="constrained")
    axes = np.atleast_2d(fig.subplots(len(images), 3))
    for row, image in zip(axes, images, strict=True):
        digit = torch.from_numpy(preprocessing.normalize_digit(image.numpy()))
        model_input = preprocessing.to_model_input(digit[None])[0]
        _show_digit(row[0], image)
        row[0].set_title(f"given: {_shape(image)} {_dtype(image)}", fontsize=10)
        _show_digit(row[1], digit)
        row[1].set_title(f"normalize_digit: {_shape(digit)} {_dtype(digit)}\n"
                         "light ink, 20×20 box, centred by mass", fontsize=10)
        channel = model_input[0].numpy()
        shown = row[2].imshow(channel, cmap="gray")
        row[2].set_title(f"to_model_input: {_shape(model_input)} {_dtype(model_input)}\n"
                         f"values {channel.min():.2f} … {channel.max():.2f}", fontsize=10)
        row[2].set_xticks([])
        row[2].set_yticks([])
        fig.colorbar(shown, ax=row[2], shrink=0.8)
    fig.suptitle("What the model sees: the same preprocessing in training and in TorchServe")
    return save_figure(fig, save_to)


def as_sent_and_normalized(
    payloads: Sequence[bytes], titles: Sequence[str], save_to: Path | None = None
) -> Figure:
    """Each image as a person sends it, beside the 28×28 digit the handler makes of it."""
    fig = Figure(figsize=(6.5, 3.0 * len(payloads)), layout="constrained")
    axes = np.atleast_2d(fig.subplots(len(payloads), 2))
    for row, payload, title in zip(axes, payloads, titles, strict=True):
        with Image.open(io.BytesIO(payload)) as sent:
            shown = sent.convert("RGBA")
            row[0].set_title(f"{title}\n{sent.width}×{sent.height} {sent.mode}", fontsize=10)
        checker = np.indices(shown.size[::-1]).sum(axis=0) // 16 % 2 * 40 + 200
        row[0].imshow(checker, cmap="gray", vmin=0, vmax=255)  # shows transparency
        row[0].imshow(np.asarray(shown))
        row[0].set_xticks([])
        row[0].set_yticks([])
        _show_digit(row[1], torch.from_numpy(preprocessing.digit_from_payload(payload)))
        row[1].set_title("what the model sees (28×28)", fontsize=10)
    return save_figure(fig, save_to)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> Markdown:
    """Rows shown as a table in a notebook (``|`` in cells escaped)."""
    def cell(value: object) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(value) for value in row) + " |" for row in rows]
    return Markdown("\n".join(lines))


def training_curves(metrics: dict, save_to: Path | None = None) -> Figure:
    """Loss and accuracy during training (every few batches) and on the test set (per epoch).

    From ``train()``'s metrics. The training loss is taken against label-smoothed targets and
    with dropout on, so it cannot reach the test loss: the dashed line is the lowest value label
    smoothing allows (``train.target_ceiling``).
    """
    curve, history = metrics["curve"], metrics["epochs"]
    tested = [row for row in history if "test_accuracy" in row]
    fig = Figure(figsize=(11, 4), layout="constrained")
    loss_ax, accuracy_ax = fig.subplots(1, 2)
    steps = [point["epoch"] for point in curve]
    loss_ax.plot(steps, [point["train_loss"] for point in curve], "-", label="training batches")
    loss_ax.plot([row["epoch"] for row in tested], [row["test_loss"] for row in tested], "s",
                 color="tab:orange", markersize=8, label="test set, after the epoch")
    floor = metrics["target"]["lowest_loss"]
    smoothing = metrics["settings"]["label_smoothing"]
    loss_ax.axhline(floor, color="gray", linestyle="--", linewidth=1)
    # Below the dashed line: the training curve runs just above it.
    loss_ax.text(steps[-1], floor * 0.96, f"lowest training loss label smoothing {smoothing:g} "
                 f"allows: {floor:.2f}", ha="right", va="top", fontsize=8.5, color="gray")
    loss_ax.set(title="cross-entropy loss", xlabel="epoch", ylabel="loss", ylim=(0, None))
    accuracy_ax.plot(steps, [100 * point["train_accuracy"] for point in curve], "-",
                     label="training batches")
    accuracy_ax.plot([row["epoch"] for row in tested],
                     [100 * row["test_accuracy"] for row in tested], "s", color="tab:orange",
                     markersize=8, label="test set, after the epoch")
    final = 100 * history[-1]["test_accuracy"]
    accuracy_ax.set(title=f"accuracy (test, last epoch: {final:.2f} %)", xlabel="epoch",
                    ylabel="% correct", ylim=(max(0.0, min(80.0, final - 10)), 100.5))
    for ax in (loss_ax, accuracy_ax):
        ax.set_xlim(0, max(steps[-1], 1) * 1.02)
        ax.grid(alpha=0.3)
        ax.legend(loc="center right")
    epochs = metrics["settings"]["epochs"]
    fig.suptitle(f"Training on {metrics['train_images']:,} images, {epochs:g} "
                 f"epoch{'s' if epochs != 1 else ''}, {metrics['wall_time_s']:.0f} s "
                 f"on {metrics['device']}")
    return save_figure(fig, save_to)


def confusion_matrix(cm: torch.Tensor, title: str = "Confusion matrix",
                     save_to: Path | None = None) -> Figure:
    """Counts of (true, predicted) digits, on a log colour scale so rare mistakes still show.

    ``cm`` comes from ``evaluate.confusion_counts``; ``title`` says whose answers they are.
    """
    counts = cm.numpy()
    fig = Figure(figsize=(6.4, 5.6), layout="constrained")
    ax = fig.subplots()
    shown = ax.imshow(np.ma.masked_equal(counts, 0), cmap="Blues",
                      norm=LogNorm(vmin=1, vmax=max(int(counts.max()), 2)))
    dark_from = math.sqrt(max(int(counts.max()), 1))
    for (true, predicted), count in np.ndenumerate(counts):
        if count:
            ax.text(predicted, true, str(count), ha="center", va="center", fontsize=8,
                    color="white" if count > dark_from else "black")
    ax.set(xticks=range(10), yticks=range(10), xlabel="predicted digit", ylabel="true digit")
    fig.colorbar(shown, ax=ax, shrink=0.8, label="images (log scale)")
    accuracy = np.trace(counts) / counts.sum()
    ax.set_title(f"{title}{': ' if title else ''}{counts.sum() - np.trace(counts):,} mistakes "
                 f"in {counts.sum():,} ({100 * accuracy:.2f} % correct)")
    return save_figure(fig, save_to)


def misclassified(
    images: torch.Tensor, labels: torch.Tensor, predicted: torch.Tensor,
    probabilities: torch.Tensor, max_n: int = 24, columns: int = 8, title: str = "",
    save_to: Path | None = None,
) -> Figure:
    """The mistakes the model is surest of first: they show what it has not learned.

    ``title`` says whose answers they are (e.g. "version 2.0, through gRPC").
    """
    wrong = torch.nonzero(labels != predicted).flatten()
    confidence = probabilities[wrong, predicted[wrong]]
    shown = wrong[confidence.argsort(descending=True)][:max_n]
    fig, axes = _grid(max(len(shown), 1), columns)
    if not len(shown):
        axes[0].axis("off")
        axes[0].set_title("no mistakes")
    for ax, index in zip(axes[: len(shown)], shown.tolist(), strict=True):
        _show_digit(ax, images[index])
        ax.set_title(f"true {int(labels[index])} → {int(predicted[index])}\n"
                     f"{100 * probabilities[index, predicted[index]]:.0f} % sure",
                     fontsize=9, color=WRONG_COLOR)
    fig.suptitle(f"{title}{': ' if title else ''}{len(shown)} of {len(wrong):,} misclassified "
                 "digits, most confident first")
    return save_figure(fig, save_to)


def predictions_grid(
    images_or_paths: Sequence[torch.Tensor | Path | str], true_labels: Sequence[int],
    predictions: Sequence[Prediction], columns: int = 10, save_to: Path | None = None,
) -> Figure:
    """Each image beside the served model's answer; wrong answers get a red title."""
    fig, axes = _grid(len(predictions), columns)
    n_correct = 0
    cells = zip(axes, images_or_paths, true_labels, predictions, strict=True)
    for ax, image, truth, prediction in cells:
        right = prediction.digit == truth
        n_correct += right
        _show_digit(ax, image)
        ax.set_title(f"→ {prediction.digit} ({100 * prediction.probability:.1f} %)\n"
                     f"true {truth}", fontsize=9, color="black" if right else WRONG_COLOR)
    fig.suptitle(f"TorchServe's answers: {n_correct} of {len(predictions)} correct")
    return save_figure(fig, save_to)


def _grid(n: int, columns: int) -> tuple[Figure, list[Axes]]:
    """A figure of ``n`` image cells in rows of ``columns``; unused cells are hidden."""
    columns = min(columns, n)
    rows = math.ceil(n / columns)
    fig = Figure(figsize=(CELL_INCHES * columns, 1.3 * CELL_INCHES * rows + 0.4),
                 layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, columns)).flatten().tolist()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def _show_digit(ax: Axes, image: torch.Tensor | Path | str) -> None:
    """Draw a grayscale digit (tensor or image file) as stored: 0 black, 255 white."""
    if isinstance(image, (str, Path)):
        with Image.open(image) as opened:
            image = opened.convert("L")
    ax.imshow(np.asarray(image), cmap="gray", vmin=0, vmax=255)
    ax.set_xticks([])
    ax.set_yticks([])


def _shape(tensor: torch.Tensor) -> str:
    return "×".join(str(size) for size in tensor.shape)


def _dtype(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


def save_figure(fig: Figure, save_to: Path | None) -> Figure:
    """Write the figure as a PNG when asked (creating its folder), and return it."""
    if save_to is not None:
        Path(save_to).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(save_to, dpi=110, bbox_inches="tight")
    return fig
