"""Draw a digit in JupyterLab and see what the served model makes of it.

``drawing_pad(client)`` shows a canvas (an ``anywidget`` whose drawing code runs in the browser,
no internet needed) beside the model's answer. Each time you lift the pen, the drawing goes to
TorchServe as PNG bytes over gRPC (``client.predict``), and the answer comes back as a bar chart
of the ten probabilities. Head-less (papermill, CI: ``interactive=False``) there is nobody to
draw, so a digit drawn in code takes the canvas's place and the same chart is shown.

``live_drawing_pad(client)`` is the same canvas wired to the stateful live-drawing model
(``digitserve.live``): each stroke, as it is finished, goes over one open StreamPredictions2
call as a few hundred bytes of points, and the answer for the canvas so far comes back after
every stroke. Head-less, a scripted drawing of five strokes takes the pen's place.

``png_from_strokes`` draws a digit from pen strokes in code, as the canvas would.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from digitserve import preprocessing, progress
from digitserve import strokes as pen_strokes
from digitserve.strokes import CANVAS_PIXELS, PEN_PIXELS

if TYPE_CHECKING:
    from digitserve.client import DigitClient, Prediction
    from digitserve.live import LiveDrawingRun

__all__ = ["CANVAS_PIXELS", "PEN_PIXELS", "EXAMPLE_STROKES", "png_from_strokes",
           "probability_chart", "drawing_pad", "live_drawing_pad", "live_drawing_figure",
           "live_wire_figure"]

#: Pen strokes for a few digits, in fractions of the canvas (x right, y down).
EXAMPLE_STROKES: dict[int, list[list[tuple[float, float]]]] = {
    1: [[(0.42, 0.27), (0.52, 0.18), (0.52, 0.82)]],
    4: [[(0.6, 0.82), (0.6, 0.18), (0.25, 0.6), (0.75, 0.6)]],
    7: [[(0.25, 0.2), (0.75, 0.2), (0.45, 0.82)]],
}

#: What head-less runs print instead of the pad.
HEADLESS_MESSAGE = (
    "No drawing pad here: this notebook runs head-less (INTERACTIVE = False, as papermill\n"
    "and CI run it), so nobody can draw. Open it in JupyterLab (`make lab`) to draw your own;\n"
    "below is the answer for a digit drawn in code instead."
)

_CANVAS_ESM = """
function render({ model, el }) {
  const size = model.get("size");
  const canvas = document.createElement("canvas");
  canvas.width = size;
  canvas.height = size;
  canvas.className = "digitserve-canvas";
  canvas.style.cssText = `width:${size}px;height:${size}px;border:2px solid #888;` +
    "border-radius:6px;background:white;cursor:crosshair;touch-action:none;display:block";
  const ctx = canvas.getContext("2d");
  const clear = () => { ctx.fillStyle = "white"; ctx.fillRect(0, 0, size, size); };
  clear();
  let drawing = false;
  let points = [];
  let count = 0;
  const pen = () => {
    ctx.strokeStyle = "black";
    ctx.lineWidth = model.get("pen");
    ctx.lineCap = "round";
    ctx.lineJoin = "round";
  };
  const at = (event) => [Math.round(event.offsetX), Math.round(event.offsetY)];
  canvas.addEventListener("pointerdown", (event) => {
    drawing = true;
    canvas.setPointerCapture(event.pointerId);
    pen();
    const [x, y] = at(event);
    points = [[x, y]];
    ctx.beginPath();
    ctx.moveTo(x, y);
    ctx.lineTo(x + 0.1, y + 0.1);
    ctx.stroke();
  });
  canvas.addEventListener("pointermove", (event) => {
    if (!drawing) return;
    const [x, y] = at(event);
    const [px, py] = points[points.length - 1];
    if (x === px && y === py) return;
    points.push([x, y]);
    ctx.lineTo(x, y);
    ctx.stroke();
  });
  const lift = () => {
    if (!drawing) return;
    drawing = false;
    count += 1;
    model.set("png", canvas.toDataURL("image/png"));
    model.set("stroke", { n: count, points: points });
    model.save_changes();
  };
  canvas.addEventListener("pointerup", lift);
  canvas.addEventListener("pointercancel", lift);
  const button = document.createElement("button");
  button.textContent = "Clear";
  button.className = "digitserve-clear";
  button.style.cssText = "margin-top:6px;padding:4px 14px";
  button.addEventListener("click", () => {
    clear();
    count += 1;
    model.set("png", "");
    model.set("stroke", { n: count, clear: true });
    model.save_changes();
  });
  el.append(canvas, button);
}
export default { render };
"""


def png_from_strokes(strokes: Sequence[Sequence[tuple[float, float]]],
                     size: int = CANVAS_PIXELS, pen: int = PEN_PIXELS) -> bytes:
    """A PNG of black pen strokes on white, like the canvas sends.

    Args:
        strokes: each stroke a list of (x, y) points in fractions of the canvas, (0, 0) top left.
        size: the canvas's side in pixels. pen: the pen's width in pixels.

    Returns:
        The PNG file's bytes, ready for ``client.predict``.
    """
    canvas = pen_strokes.render(([(x * size, y * size) for x, y in stroke] for stroke in strokes),
                                size, pen)
    out = io.BytesIO()
    canvas.save(out, format="PNG")
    return out.getvalue()


def probability_chart(png: bytes, prediction: Prediction, drawn_by: str = "you") -> Figure:
    """The drawing as sent, the 28×28 digit the handler makes of it, and the ten probabilities.

    ``drawn_by``: "you" (the pad) or e.g. "code" for a digit drawn with ``png_from_strokes``.
    """
    fig = Figure(figsize=(9.5, 2.9), layout="constrained")
    sent_ax, seen_ax, bars_ax = fig.subplots(1, 3, width_ratios=[1, 1, 2.6])
    with Image.open(io.BytesIO(png)) as sent:
        sent_ax.imshow(np.asarray(sent.convert("L")), cmap="gray", vmin=0, vmax=255)
    sent_ax.set_title("what you drew" if drawn_by == "you" else f"drawn in {drawn_by}",
                      fontsize=10)
    seen_ax.imshow(preprocessing.digit_from_payload(png), cmap="gray", vmin=0, vmax=255)
    seen_ax.set_title("the handler's 28×28 digit\n(the model gets it as 3×96×96)", fontsize=9)
    for ax in (sent_ax, seen_ax):
        ax.set_xticks([])
        ax.set_yticks([])
    probabilities = 100 * np.asarray(prediction.probabilities)
    colors = ["tab:blue" if digit == prediction.digit else "#b8c4d0" for digit in range(10)]
    bars_ax.bar(range(10), probabilities, color=colors)
    for digit, value in enumerate(probabilities):
        if value >= 1:
            bars_ax.text(digit, value + 1.5, f"{value:.0f}", ha="center", fontsize=8)
    bars_ax.set(xticks=range(10), ylim=(0, 105), xlabel="digit", ylabel="probability (%)")
    bars_ax.set_title(f"TorchServe says {prediction.digit} ({probabilities.max():.1f} %)",
                      fontsize=11, fontweight="bold")
    bars_ax.grid(axis="y", alpha=0.3)
    return fig


def figure_png(fig: Figure) -> bytes:
    """A figure's PNG bytes (for an ``ipywidgets.Image``)."""
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=90)
    return out.getvalue()


def drawing_pad(client: DigitClient, interactive: bool | None = None, example_digit: int = 7):
    """A canvas to draw a digit on, beside TorchServe's answer, updated at every pen lift.

    Args:
        client: an open ``DigitClient``; keep its server running while you draw.
        interactive: False where nobody can draw (papermill, CI): the answer for a digit
            drawn in code (``EXAMPLE_STROKES[example_digit]``) is shown instead. None: True
            unless ``DIGITSERVE_HEADLESS=1`` (set for the kernels ``digitserve.notebooks``
            starts).

    Returns:
        The widget to show in JupyterLab, or, head-less, the answer's figure.
    """
    if interactive is None:
        interactive = not progress.headless()
    if not interactive:
        print(HEADLESS_MESSAGE)
        png = png_from_strokes(EXAMPLE_STROKES[example_digit])
        return probability_chart(png, client.predict(png), drawn_by="code")

    import ipywidgets as widgets

    from digitserve.client import ServingError

    canvas = _canvas_widget()
    status = widgets.HTML("<b>Draw a digit</b> (0–9) with the mouse, large, in the middle. "
                          "Each time you lift the pen, TorchServe answers.")
    # Hidden until there is an answer: an empty Image shows as a broken picture.
    answer = widgets.Image(format="png", layout=widgets.Layout(
        width="100%", max_width="760px", display="none"))

    def show(chart: bytes) -> None:
        answer.value = chart
        answer.layout.display = "block" if chart else "none"

    def on_drawing(change: dict) -> None:
        if not change["new"]:
            show(b"")
            status.value = "<b>Cleared.</b> Draw another digit."
            return
        png = base64.b64decode(change["new"].split(",", 1)[1])
        status.value = f"Sending {len(png):,} bytes of PNG over gRPC..."
        try:
            prediction = client.predict(png)
        except ServingError as err:
            show(b"")
            status.value = _error_html(err)
            return
        show(figure_png(probability_chart(png, prediction)))
        status.value = (f"Sent {len(png):,} bytes of PNG over gRPC: the answer is "
                        f"<b>{prediction.digit}</b> ({prediction.probability:.1%}). "
                        "Draw over it, or <i>Clear</i> and draw another.")

    canvas.observe(on_drawing, names="png")
    # Side by side when the notebook is wide enough, the answer under the canvas otherwise.
    return widgets.HBox(
        [canvas, widgets.VBox([status, answer], layout=widgets.Layout(
            flex="1 1 420px", min_width="300px", margin="0 0 0 16px"))],
        layout=widgets.Layout(flex_flow="row wrap", align_items="flex-start"))


LIVE_HEADLESS_MESSAGE = (
    "No drawing pad here: this notebook runs head-less (INTERACTIVE = False), so nobody can\n"
    "draw. Open it in JupyterLab (`make lab`) to draw your own; below, a 5 drawn in code in five\n"
    "strokes goes to the live model the same way, one stroke at a time."
)


def live_drawing_pad(client: DigitClient, interactive: bool | None = None):
    """A canvas whose every stroke goes to the live model as it is finished, and its answers.

    Each pen lift sends the stroke's points over one open StreamPredictions2 call
    (``live.LiveDrawing``); the list under the canvas grows by one answer per stroke, with the
    bytes sent beside the size of the PNG a stateless API would need. *Clear* starts a new
    digit on the same sequence. Head-less (``interactive=False``, or ``DIGITSERVE_HEADLESS=1``)
    a scripted 5 (``live.SCRIPTED_STROKES``) is drawn instead and its answers shown as a figure.
    """
    from digitserve import live
    from digitserve.client import ServingError

    if interactive is None:
        interactive = not progress.headless()
    if not interactive:
        print(LIVE_HEADLESS_MESSAGE)
        drawing = live.scripted_drawing()
        with live.LiveDrawing(client) as session:
            answers = [session.send(points) for points in drawing]
        return live_drawing_figure(drawing, [a.prediction for a in answers],
                                   [a.request_bytes for a in answers])

    import ipywidgets as widgets

    canvas = _canvas_widget()
    session = live.LiveDrawing(client)
    status = widgets.HTML(
        "<div class='digitserve-live-status'><b>Draw a digit</b> (0–9), one stroke at a time. "
        "Each stroke goes to TorchServe as you lift the pen; the answer comes back at once.</div>")
    listing = widgets.HTML("")
    answer = widgets.Image(format="png", layout=widgets.Layout(
        width="100%", max_width="760px", display="none"))
    rows: list[str] = []

    def on_stroke(change: dict) -> None:
        message = change["new"] or {}
        if message.get("clear"):
            session.clear()
            rows.clear()
            listing.value = ""
            answer.layout.display = "none"
            status.value = ("<div class='digitserve-live-status'><b>Cleared.</b> Draw another "
                            "digit: the next stroke starts a new canvas on the server.</div>")
            return
        points = message.get("points") or []
        if not points:
            return
        try:
            result = session.send(points)
        except ServingError as err:
            status.value = f"<div class='digitserve-live-status'>{_error_html(err)}</div>"
            return
        prediction = result.prediction
        png = base64.b64decode(canvas.png.split(",", 1)[1]) if canvas.png else b""
        if png:  # the chart first: the list below is what says this stroke is answered
            answer.value = figure_png(probability_chart(png, prediction))
            answer.layout.display = "block"
        status.value = (
            f"<div class='digitserve-live-status' data-digit='{prediction.digit}'>After "
            f"{result.strokes} stroke(s) TorchServe says <b>{prediction.digit}</b> "
            f"({prediction.probability:.1%}). Keep drawing, or <i>Clear</i>.</div>")
        rows.append(
            f"<li data-digit='{prediction.digit}' data-probability='{prediction.probability}'>"
            f"stroke {result.strokes}: <b>{prediction.digit}</b> "
            f"({prediction.probability:.1%}), {result.request_bytes:,} bytes sent in "
            f"{1000 * result.seconds:.0f} ms (the whole canvas as PNG: {len(png):,} bytes)</li>")
        listing.value = f"<ol class='digitserve-live-answers'>{''.join(rows)}</ol>"

    canvas.observe(on_stroke, names="stroke")
    return widgets.HBox(
        [canvas, widgets.VBox([status, listing, answer], layout=widgets.Layout(
            flex="1 1 420px", min_width="300px", margin="0 0 0 16px"))],
        layout=widgets.Layout(flex_flow="row wrap", align_items="flex-start"))


def live_drawing_figure(drawing: Sequence[Sequence[Sequence[float]]],
                        answers: Sequence[Prediction], sent_bytes: Sequence[int]) -> Figure:
    """The canvas after each stroke (the new one in blue) with the answer it got."""
    from digitserve import live

    fig = Figure(figsize=(2.2 * len(drawing), 2.9), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(drawing)))
    for n, (ax, prediction, sent) in enumerate(zip(axes, answers, sent_bytes, strict=True), 1):
        before = np.asarray(pen_strokes.render(drawing[: n - 1]), dtype=np.float32) / 255
        after = np.asarray(pen_strokes.render(drawing[:n]), dtype=np.float32) / 255
        new = (after < before)[..., None]
        rgb = np.where(new, np.array([0.12, 0.47, 0.71]), np.repeat(after[..., None], 3, -1))
        ax.imshow(rgb)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"stroke {n}: {prediction.digit} ({prediction.probability:.0%})",
                     fontsize=10, fontweight="bold" if n == len(drawing) else "normal")
        png = len(live.canvas_png(drawing[:n]))
        ax.set_xlabel(f"message {sent} B\n(the canvas as PNG: {png:,} B)", fontsize=9)
    return fig


#: What the pads add when the server is gone: the lessons stop theirs in their last cell.
RESTART_HINT = ("The lesson's last cell stops the server: to draw again, run `ts.start()` in a "
                "new cell, and `ts.stop()` when you are done.")


def _error_html(err: Exception) -> str:
    from digitserve.client import ServerUnavailableError

    hint = f" {RESTART_HINT}" if isinstance(err, ServerUnavailableError) else ""
    return f"<b style='color:#c0392b'>{html.escape(str(err) + hint)}</b>"


def _canvas_widget():
    """The anywidget canvas (imported here: only the interactive pad needs anywidget)."""
    try:
        import anywidget
        import traitlets
    except ImportError:
        raise ImportError(
            "the drawing pad needs the anywidget package, which `make env` installs: run "
            "`make env`, or `.venv/bin/pip install anywidget` and restart the kernel."
        ) from None

    class DigitCanvas(anywidget.AnyWidget):
        _esm = _CANVAS_ESM
        size = traitlets.Int(CANVAS_PIXELS).tag(sync=True)
        pen = traitlets.Int(PEN_PIXELS).tag(sync=True)
        #: The drawing as a ``data:image/png;base64,...`` URL; "" once cleared.
        png = traitlets.Unicode("").tag(sync=True)
        #: The stroke just finished: ``{"n": count, "points": [[x, y], ...]}`` in canvas pixels,
        #: or ``{"n": count, "clear": true}`` for the Clear button.
        stroke = traitlets.Dict().tag(sync=True)

    return DigitCanvas()


def live_wire_figure(run: LiveDrawingRun) -> Figure:
    """Bytes on the wire for each update of a measured drawing, gRPC against REST, and the
    time per update (``live.run_live_drawing``)."""
    fig = Figure(figsize=(10, 3.4), layout="constrained")
    bytes_ax, time_ax = fig.subplots(1, 2, width_ratios=[2.2, 1])
    n = np.arange(1, len(run.strokes) + 1)
    width = 0.38
    for offset, api, color in ((-width / 2, "grpc", "tab:blue"), (width / 2, "rest", "tab:orange")):
        wire = np.array([getattr(s, f"{api}_wire") for s in run.strokes])
        label = "gRPC, the new stroke" if api == "grpc" else "REST, the whole canvas (PNG)"
        bytes_ax.bar(n + offset, wire[:, 0], width, color=color, label=f"{label}: sent")
        bytes_ax.bar(n + offset, wire[:, 1], width, bottom=wire[:, 0], color=color, alpha=0.45,
                     label=f"{label}: received")
    tallest = max(max(sum(s.grpc_wire), sum(s.rest_wire)) for s in run.strokes)
    bytes_ax.set(xticks=n, xlabel="stroke", ylabel="bytes on the wire", ylim=(0, 1.5 * tallest))
    bytes_ax.set_title("Each update on the wire (stroke 1 includes the connection set-up)",
                       fontsize=10)
    bytes_ax.legend(fontsize=8, loc="upper left", ncol=2, frameon=False)
    bytes_ax.grid(axis="y", alpha=0.3)
    times = [run.ms_grpc, run.ms_rest]
    time_ax.boxplot(times, showfliers=False, widths=0.5)
    time_ax.set_xticks([1, 2], ["gRPC", "REST"])
    time_ax.set(ylabel="ms from sending to the answer", ylim=(0, None))
    time_ax.set_title(f"Time per update ({len(run.ms_grpc)} each)", fontsize=10)
    time_ax.grid(axis="y", alpha=0.3)
    return fig
