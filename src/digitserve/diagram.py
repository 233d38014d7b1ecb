"""One picture of where a prediction goes: client → gRPC → Java frontend → Python worker → back.

``request_path()`` draws it with matplotlib's Figure API (no pyplot), so it works head-less and
in any notebook; ``save_to`` also writes it as a PNG. Notebooks 03 and 04 show it.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

from digitserve.config import DEFAULT_PORTS, HOST, Ports

#: One colour per world the request passes through.
COLORS = {
    "client": "#dbe9f6",  # your Python (notebook, CLI)
    "java": "#fde2c8",  # TorchServe's frontend, a Java program
    "python": "#d9f0d3",  # TorchServe's worker, a Python process running the handler
}
EDGES = {"client": "#3b75af", "java": "#c8651b", "python": "#3a8a3a"}


def request_path(ports: Ports = DEFAULT_PORTS, batch_size: int = 1, max_batch_delay_ms: int = 5,
                 save_to: Path | None = None) -> Figure:
    """The path of one ``Predictions`` call through TorchServe and back, as a Figure.

    Args:
        ports: the ports to label (the kit's defaults, shifted by ``DIGITSERVE_PORT_OFFSET``).
        batch_size, max_batch_delay_ms: the batching settings to label on the frontend.
        save_to: also write the figure there as a PNG (its folder is created).

    Returns:
        The figure; in a notebook it shows as the cell's result.
    """
    fig = Figure(figsize=(13, 5.6), layout="constrained")
    ax = fig.subplots()
    ax.set(xlim=(0, 132), ylim=(0, 56))
    ax.axis("off")

    # The four places a request passes through, left to right.
    _box(ax, 1, 13, 20, 30, "client",
         "Your Python\n(notebook or CLI)", "DigitClient.predict(png)\n\nthe PNG's bytes go into\n"
         "a PredictionsRequest\n(a protobuf message),\nsent with the token\n"
         "(metadata: authorization)\nand a deadline")
    frontend = _box(ax, 37, 4, 38, 42, "java", "TorchServe frontend (Java)",
                    f"listens on {HOST}:{ports.grpc_inference}\n(management: "
                    f":{ports.grpc_management})")
    _step(ax, frontend, 0, "1  check the token", "no or wrong key → PERMISSION_DENIED")
    _step(ax, frontend, 1, "2  queue per model", "waits for a free worker")
    batching = (f"up to {batch_size} requests within {max_batch_delay_ms} ms,\nfrom any callers"
                if batch_size > 1 else "batch_size 1: one request at a time\n"
                "(a larger batch_size groups callers)")
    _step(ax, frontend, 2, "3  batch", batching)
    worker = _box(ax, 89, 4, 42, 42, "python", "TorchServe worker (Python process)",
                  "unpacked .mar: model.py, digitcnn.pt,\nhandler.py, preprocessing.py")
    _step(ax, worker, 0, "handler: preprocess", "bytes → 28×28 digit → 3×96×96 tensor")
    _step(ax, worker, 1, "model: DigitCNN", "one forward pass for the whole batch → logits")
    _step(ax, worker, 2, "handler: softmax", 'JSON {"digit", "probability",\n"probabilities"}')

    # The request goes right along the top, the answer comes back along the bottom.
    _arrow(ax, (21.6, 36), (36.4, 36), "request", "gRPC:\nHTTP/2 frames\ncarrying protobuf",
           above=True)
    _arrow(ax, (75.6, 36), (88.4, 36), "request", "a batch, over\na local socket", above=True)
    _arrow(ax, (88.4, 12), (75.6, 12), "answer", "one answer\nper request", above=False)
    _arrow(ax, (36.4, 20), (21.6, 20), "answer", "PredictionResponse\n(JSON bytes)",
           above=False)

    ax.text(66, 54, "The path of one prediction", ha="center", va="top", fontsize=14,
            fontweight="bold")
    ax.text(66, 50.5,
            "blue: your process · orange: TorchServe's Java frontend · green: its Python worker."
            "  Errors come back as gRPC status codes (INVALID_ARGUMENT, PERMISSION_DENIED, ...)",
            ha="center", va="top", fontsize=9.5, color="#444444")
    if save_to is not None:
        Path(save_to).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(save_to, dpi=110, bbox_inches="tight")
    return fig


def _box(ax: Axes, x: float, y: float, width: float, height: float, kind: str, title: str,
         body: str) -> tuple[float, float, float, float]:
    """A rounded box with a bold title at the top; returns its bounds for steps inside it."""
    ax.add_patch(FancyBboxPatch((x, y), width, height, boxstyle="round,pad=0.4,rounding_size=1.5",
                                facecolor=COLORS[kind], edgecolor=EDGES[kind], linewidth=1.6))
    ax.text(x + width / 2, y + height - 1.5, title, ha="center", va="top", fontsize=11,
            fontweight="bold", color=EDGES[kind])
    # A box with steps inside gets its body just under the title; a plain box, centred.
    has_steps = kind in ("java", "python")
    ax.text(x + width / 2, y + height - 5.5 if has_steps else y + height / 2 - 2, body,
            ha="center", va="top" if has_steps else "center", fontsize=9, linespacing=1.25)
    return x, y, width, height


def _step(ax: Axes, bounds: tuple[float, float, float, float], index: int, title: str,
          note: str) -> None:
    """One of three stacked steps inside a box, top to bottom, with a down arrow between."""
    x, y, width, height = bounds
    top = y + height - 12 - index * 10.5
    ax.add_patch(FancyBboxPatch((x + 2, top - 7.5), width - 4, 7.5,
                                boxstyle="round,pad=0.2,rounding_size=0.8",
                                facecolor="white", edgecolor="#999999", linewidth=1))
    ax.text(x + width / 2, top - 1.2, title, ha="center", va="top", fontsize=9.5,
            fontweight="bold")
    ax.text(x + width / 2, top - 3.9, note, ha="center", va="top", fontsize=8.5, color="#333333",
            linespacing=1.15)
    if index < 2:
        ax.add_patch(FancyArrowPatch((x + width / 2, top - 7.8), (x + width / 2, top - 10.3),
                                     arrowstyle="-|>", mutation_scale=10, color="#777777"))


def _arrow(ax: Axes, start: tuple[float, float], end: tuple[float, float], kind: str,
           label: str, above: bool) -> None:
    color = "#3b75af" if kind == "request" else "#3a8a3a"
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=18,
                                 linewidth=2.2, color=color))
    middle = (start[0] + end[0]) / 2
    ax.text(middle, start[1] + (1.2 if above else -1.2), label, ha="center",
            va="bottom" if above else "top", fontsize=8.5, color=color, linespacing=1.15)
