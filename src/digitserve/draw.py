"""Draw a digit in JupyterLab and see what the served model makes of it.

``drawing_pad(client)`` shows a canvas (an ``anywidget`` whose drawing code runs in the browser,
no internet needed) beside the model's answer. Each time you lift the pen, the drawing goes to
TorchServe as PNG bytes over gRPC (``client.predict``), and the answer comes back as a bar chart
of the ten probabilities. Head-less (papermill, CI: ``interactive=False``) there is nobody to
draw, so a digit drawn in code takes the canvas's place and the same chart is shown.

``png_from_strokes`` draws a digit from pen strokes in code, as the canvas would.
"""

from __future__ import annotations

import base64
import html
import io
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.figure import Figure
from PIL import Image, ImageDraw

from digitserve import preprocessing

if TYPE_CHECKING:
    from digitserve.client import DigitClient, Prediction

#: The canvas's side in pixels and the pen's width: about MNIST's proportions (a 20-pixel digit
#: drawn with a 2–3-pixel pen in a 28-pixel square), ten times larger.
CANVAS_PIXELS = 280
PEN_PIXELS = 22

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
  canvas.style.cssText = `width:${size}px;height:${size}px;border:2px solid #888;` +
    "border-radius:6px;background:white;cursor:crosshair;touch-action:none;display:block";
  const ctx = canvas.getContext("2d");
  const clear = () => { ctx.fillStyle = "white"; ctx.fillRect(0, 0, size, size); };
  clear();
  let drawing = false;
  const pen = () => {
    ctx.strokeStyle = "black";
    ctx.lineWidth = model.get("pen");
    ctx.lineCap = "round";
    ctx.lineJoin = "round";
  };
  canvas.addEventListener("pointerdown", (event) => {
    drawing = true;
    canvas.setPointerCapture(event.pointerId);
    pen();
    ctx.beginPath();
    ctx.moveTo(event.offsetX, event.offsetY);
    ctx.lineTo(event.offsetX + 0.1, event.offsetY + 0.1);
    ctx.stroke();
  });
  canvas.addEventListener("pointermove", (event) => {
    if (!drawing) return;
    ctx.lineTo(event.offsetX, event.offsetY);
    ctx.stroke();
  });
  const lift = () => {
    if (!drawing) return;
    drawing = false;
    model.set("png", canvas.toDataURL("image/png"));
    model.save_changes();
  };
  canvas.addEventListener("pointerup", lift);
  canvas.addEventListener("pointercancel", lift);
  const button = document.createElement("button");
  button.textContent = "Clear";
  button.style.cssText = "margin-top:6px;padding:4px 14px";
  button.addEventListener("click", () => {
    clear();
    model.set("png", "");
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
    image = Image.new("L", (size, size), 255)
    draw = ImageDraw.Draw(image)
    for stroke in strokes:
        points = [(x * size, y * size) for x, y in stroke]
        draw.line(points, fill=0, width=pen, joint="curve")
        for x, y in points[:1] + points[-1:]:  # round pen ends, as the canvas draws them
            draw.ellipse((x - pen / 2, y - pen / 2, x + pen / 2, y + pen / 2), fill=0)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def probability_chart(png: bytes, prediction: Prediction) -> Figure:
    """The drawing as sent, the 28×28 digit the handler makes of it, and the ten probabilities."""
    fig = Figure(figsize=(9.5, 2.9), layout="constrained")
    sent_ax, seen_ax, bars_ax = fig.subplots(1, 3, width_ratios=[1, 1, 2.6])
    with Image.open(io.BytesIO(png)) as sent:
        sent_ax.imshow(np.asarray(sent.convert("L")), cmap="gray", vmin=0, vmax=255)
    sent_ax.set_title("what you drew", fontsize=10)
    seen_ax.imshow(preprocessing.digit_from_payload(png), cmap="gray", vmin=0, vmax=255)
    seen_ax.set_title("what the model sees (28×28)", fontsize=10)
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
        interactive = os.environ.get("DIGITSERVE_HEADLESS") != "1"
    if not interactive:
        print(HEADLESS_MESSAGE)
        png = png_from_strokes(EXAMPLE_STROKES[example_digit])
        return probability_chart(png, client.predict(png))

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
            status.value = f"<b style='color:#c0392b'>{html.escape(str(err))}</b>"
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

    return DigitCanvas()
