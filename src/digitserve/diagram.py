"""Pictures of how TorchServe serves: a request's path, batching, versions, workers on cores.

- ``request_path``: client → gRPC → Java frontend → Python worker → back (notebook 03);
- ``batching_timeline``: requests arriving, the ``max_batch_delay`` window, the dispatch (03);
- ``default_pointer``: the versions of one model and the default a request without one gets (06);
- ``workers_on_cores``: worker processes × torch threads on the machine's cores (06).

Each one draws with matplotlib's Figure API (no pyplot), so it works head-less and in any
notebook; ``save_to`` also writes it as a PNG (``plots.save_figure``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

from digitserve.config import DEFAULT_PORTS, HOST, Ports
from digitserve.plots import save_figure

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
                  "the .mar as the frontend unpacked it:\nmodel.py, digitcnn.pt, handler.py, "
                  "preprocessing.py")
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
    return save_figure(fig, save_to)


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


# -- batching -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Batch:
    """One batch as TorchServe's frontend forms it (``Model.pollBatch`` in 0.12.0)."""

    opened_ms: float  # a free worker took the first waiting request
    dispatched_ms: float  # full, or the delay ran out: sent to the worker
    done_ms: float  # the worker's answers are back
    requests: tuple[int, ...]  # indices of the requests in it
    full: bool


def simulate_batching(arrivals_ms: Sequence[float], batch_size: int, max_batch_delay_ms: float,
                      forward_ms: float = 4.0, per_request_ms: float = 0.5) -> list[Batch]:
    """Which requests go together, for one worker: TorchServe's rule, step by step.

    A free worker takes the first request waiting (or waits for one), then up to
    ``batch_size - 1`` more: those already queued at once, later ones while less than
    ``max_batch_delay_ms`` has passed since it took the first. The batch goes to the worker when
    full or when the delay is over; the worker is busy ``forward_ms + per_request_ms × n``.
    """
    arrivals = sorted(arrivals_ms)
    batches, free_at, i = [], 0.0, 0
    while i < len(arrivals):
        opened = max(free_at, arrivals[i])
        members = [i]
        i += 1
        closes = opened + max_batch_delay_ms
        while i < len(arrivals) and len(members) < batch_size and arrivals[i] <= closes:
            members.append(i)
            i += 1
        full = len(members) == batch_size
        dispatched = max(opened, arrivals[members[-1]]) if full else closes
        if batch_size == 1:
            dispatched = opened
        done = dispatched + forward_ms + per_request_ms * len(members)
        batches.append(Batch(opened, dispatched, done, tuple(members), full))
        free_at = done
    return batches


def batching_timeline(batch_size: int = 8, max_batch_delay_ms: float = 10.0,
                      arrivals_ms: Sequence[float] | None = None, forward_ms: float = 4.0,
                      save_to: Path | None = None) -> Figure:
    """Requests arriving, each batch's window, its dispatch and the forward pass, on one axis.

    The default arrivals are a burst (the batch fills before the delay is over) and then a few
    stragglers (the delay runs out and a small batch goes): the two ways a batch leaves.
    """
    if arrivals_ms is None:
        arrivals_ms = [0, 1, 1.5, 2.5, 3, 4, 4.5, 5.5, 6, 7, 19, 24, 31, 52]
    batches = simulate_batching(arrivals_ms, batch_size, max_batch_delay_ms, forward_ms)
    arrivals = sorted(arrivals_ms)
    end = max(batch.done_ms for batch in batches) + 3
    fig = Figure(figsize=(12, 4.6), layout="constrained")
    ax = fig.subplots()
    lanes = {"requests": 3, "frontend": 2, "worker": 1}
    palette = ["#3b75af", "#c8651b", "#3a8a3a", "#8e44ad", "#b03a2e", "#117a65"]
    for number, batch in enumerate(batches):
        color = palette[number % len(palette)]
        for index in batch.requests:
            ax.plot(arrivals[index], lanes["requests"], "v", color=color, markersize=10)
            if arrivals[index] < batch.opened_ms:  # it queued while the worker was busy
                ax.plot([arrivals[index], batch.opened_ms], [lanes["requests"] - 0.12] * 2,
                        ":", color=color, linewidth=1.5)
        ax.barh(lanes["frontend"], batch.dispatched_ms - batch.opened_ms, left=batch.opened_ms,
                height=0.45, color=color, alpha=0.25, edgecolor=color)
        ax.axvline(batch.dispatched_ms, ymin=0.12, ymax=0.72, color=color, linestyle=":")
        reason = "full" if batch.full else "delay over"
        ax.text(batch.dispatched_ms, lanes["frontend"] + 0.32,
                f"dispatch {len(batch.requests)}\n({reason})", ha="center", va="bottom",
                fontsize=8.5, color=color)
        ax.barh(lanes["worker"], batch.done_ms - batch.dispatched_ms, left=batch.dispatched_ms,
                height=0.45, color=color, alpha=0.8)
        ax.text((batch.dispatched_ms + batch.done_ms) / 2, lanes["worker"],
                f"{len(batch.requests)}", ha="center", va="center", color="white",
                fontsize=9, fontweight="bold")
    alone = [batch for batch in batches if len(batch.requests) == 1 and not batch.full]
    if alone and batch_size > 1:
        ax.annotate("alone: it waits the whole window", (alone[-1].opened_ms, lanes["requests"]),
                    xytext=(0, 22), textcoords="offset points", ha="center", fontsize=8.5,
                    arrowprops={"arrowstyle": "-", "color": "#777777"})
    ax.text(-1.5, 3.75, "▼ a request arrives; dotted: it waits in the queue for a free worker; "
            "one colour per batch", ha="left", va="center", fontsize=8.5, color="#555555")
    ax.set_yticks(list(lanes.values()),
                  ["requests arrive\n(any callers)",
                   f"frontend (Java): batch window\n≤ {max_batch_delay_ms:g} ms, ≤ {batch_size} "
                   "requests",
                   "worker (Python):\none forward pass"])
    ax.set(xlim=(-2, end), ylim=(0.4, 3.9), xlabel="time (ms)")
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(f"Batching with batch_size={batch_size}, max_batch_delay={max_batch_delay_ms:g} "
                 "ms: a window opens when the worker takes the first request, and the batch "
                 "goes\nwhen it is full or when the window closes. Requests arriving while "
                 "the worker is busy wait in the queue for the next window.", fontsize=10)
    return save_figure(fig, save_to)


# -- versions -----------------------------------------------------------------------------------
def default_pointer(versions: Sequence[tuple[str, str]], before: str, after: str,
                    model: str = "digitmodel", save_to: Path | None = None) -> Figure:
    """The versions of one model and where a request without a version goes, before/after.

    Args:
        versions: ``(version, what it is)`` pairs, e.g. ``("2.0", "digit-model-v2.mar, batch 16")``.
        before, after: the default version before and after ``SetDefault``.
    """
    fig = Figure(figsize=(12, 3.9), layout="constrained")
    panels = fig.subplots(1, 2)
    for ax, default, title in ((panels[0], before, "before"), (panels[1], after, "after")):
        ax.set(xlim=(0, 100), ylim=(0, 60))
        ax.axis("off")
        ax.set_title(f"{title} SetDefault({after!r})" if title == "after"
                     else "before: the version loaded first is the default", fontsize=11)
        ax.add_patch(FancyBboxPatch((42, 4), 56, 48, boxstyle="round,pad=0.4,rounding_size=1.5",
                                    facecolor=COLORS["java"], edgecolor=EDGES["java"]))
        ax.text(70, 49, f"model {model!r} (the frontend's table)", ha="center", va="top",
                fontsize=10, fontweight="bold", color=EDGES["java"])
        for row, (version, label) in enumerate(versions):
            y = 33 - row * 17
            chosen = version == default
            ax.add_patch(FancyBboxPatch((50, y - 5), 44, 11, boxstyle="round,pad=0.3",
                                        facecolor=COLORS["python"] if chosen else "white",
                                        edgecolor=EDGES["python"], linewidth=2.4 if chosen else 1))
            ax.text(72, y + 2.5, f"version {version}" + ("  ← default" if chosen else ""),
                    ha="center", va="center", fontsize=10, fontweight="bold")
            ax.text(72, y - 2.2, label, ha="center", va="center", fontsize=8.5, color="#333333")
            ax.add_patch(FancyArrowPatch((29, y), (49, y), arrowstyle="-|>", mutation_scale=14,
                                         color="#999999", linewidth=1.2))
            ax.text(2, y, f"model_version={version!r}", va="center", fontsize=9,
                    family="monospace", color="#555555")
        target_y = 33 - 17 * [v for v, _ in versions].index(default)
        ax.add_patch(FancyArrowPatch((24, 51), (49, target_y + 2), arrowstyle="-|>",
                                     mutation_scale=18, color=EDGES["client"], linewidth=2.4,
                                     connectionstyle="arc3,rad=-0.15"))
        ax.text(2, 51, "no version named", va="center", fontsize=9.5, fontweight="bold",
                color=EDGES["client"])
    return save_figure(fig, save_to)


# -- workers and cores --------------------------------------------------------------------------
def workers_on_cores(worker_counts: Sequence[int] = (1, 2), threads_per_worker: int = 1,
                     cores: int = 2, save_to: Path | None = None) -> Figure:
    """What runs on the cores with 1 and with 2 workers (each worker: its torch threads)."""
    fig = Figure(figsize=(12, 2.6), layout="constrained")
    panels = fig.subplots(1, len(worker_counts))
    for ax, workers in zip(panels, worker_counts, strict=True):
        ax.set(xlim=(0, 100), ylim=(0, 33))
        ax.axis("off")
        threads = workers * threads_per_worker
        ax.set_title(f"{workers} worker{'s' * (workers > 1)} × {threads_per_worker} torch "
                     f"thread{'s' * (threads_per_worker > 1)} on {cores} cores", fontsize=11)
        for core in range(cores):
            x = 6 + core * (88 / cores)
            width = 88 / cores - 6
            ax.add_patch(FancyBboxPatch((x, 6), width, 26, boxstyle="round,pad=0.3",
                                        facecolor="#f2f2f2", edgecolor="#777777"))
            ax.text(x + width / 2, 29, f"core {core + 1}", ha="center", va="top",
                    fontsize=10, fontweight="bold")
            runs = ([f"worker {core + 1}: forward passes"] if core < threads else [])
            runs += ["frontend (Java), callers (gRPC)"] if core >= threads or threads >= cores \
                else []
            for line, text in enumerate(runs):
                kind = "python" if text.startswith("worker") else "java"
                ax.add_patch(FancyBboxPatch((x + 2, 20 - line * 8), width - 4, 5.5,
                                            boxstyle="round,pad=0.2", facecolor=COLORS[kind],
                                            edgecolor=EDGES[kind]))
                ax.text(x + width / 2, 22.7 - line * 8, text, ha="center", va="center",
                        fontsize=8.5)
        note = ("one forward pass at a time: the other core serves the frontend and the callers"
                if threads < cores else
                "two forward passes at once; frontend and callers take turns with them")
        ax.text(50, 2, note, ha="center", va="center", fontsize=9, color="#444444")
    return save_figure(fig, save_to)
