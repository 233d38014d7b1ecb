"""Execute every notebook and render each as one self-contained HTML page, plus an index.

``build_report()`` (``digitserve report``, ``make report``) runs the lessons and then the
workshop notebooks with papermill, as ``make demo`` does, and writes ``build/report/``:
``index.html`` links one page per notebook. Figures are embedded in the pages (PNG data URIs)
and the pages load nothing from the internet (no require.js, MathJax or widget scripts from a
CDN): the folder can be zipped and mailed, and opens offline.
"""

from __future__ import annotations

import html
import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import nbformat
from jinja2 import DictLoader
from nbconvert import HTMLExporter
from nbconvert.preprocessors import CoalesceStreamsPreprocessor

from digitserve import config, notebooks

REPORT_DIR = config.BUILD_DIR / "report"
SOLUTIONS = "solutions.ipynb"

#: The JupyterLab look without its scripts: nothing is fetched from a CDN when a page opens.
_TEMPLATE_NAME = "digitserve_offline.html.j2"
_OFFLINE_TEMPLATE = """
{%- extends 'index.html.j2' -%}
{%- block html_head_js_requirejs -%}{%- endblock html_head_js_requirejs -%}
{% block jupyter_widgets %}{% endblock jupyter_widgets %}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
{%- block extra_css -%}
<style type="text/css">
.ds-nav { position: sticky; top: 0; z-index: 10; background: #f4f6f8;
          border-bottom: 1px solid #d0d7de; padding: 8px 16px; font: 14px sans-serif; }
.ds-nav a { color: #0b62a3; text-decoration: none; font-weight: bold; }
.ds-failed { background: #fdecea; color: #8a1c12; }
</style>
{%- endblock extra_css -%}
{%- block body_header -%}
{{ super() }}
<nav class="ds-nav {{ resources.ds_nav_class }}"><a href="index.html">&larr; all notebooks</a>
&middot; {{ resources.ds_note }}</nav>
{%- endblock body_header -%}
"""


@dataclass(frozen=True)
class Page:
    """One notebook of the report: where its HTML is and what the index says about it."""

    name: str
    title: str
    status: str  # "ran", "failed" or "not run"
    html: Path | None = None
    duration_s: float | None = None
    figures: int = 0
    error: str = ""
    thumbnail: str = ""  # a PNG as base64: the notebook's first figure


def build_report(quick: bool = False, execute: bool = True, solutions: bool = True,
                 executed_dir: Path = config.NOTEBOOKS_OUT_DIR,
                 out_dir: Path = REPORT_DIR) -> Path:
    """Run the notebooks (unless ``execute`` is False) and render them; return ``index.html``.

    Args:
        quick: run every notebook at its QUICK setting (what CI runs; minutes, not an hour).
        execute: False renders the executed copies already in ``executed_dir`` as they are;
            True runs each notebook unless its executed copy is current (``is_current``).
        solutions: False leaves ``solutions.ipynb`` out (a report to send to participants).
        executed_dir: where papermill writes (and this reads) the executed notebooks.
        out_dir: where the HTML pages go.

    Raises:
        notebooks.NotebookError: a notebook failed; the report is still written, with that
        notebook's page showing the error and the ones after it marked as not run.
    """
    names = [name for name in notebooks.NOTEBOOKS + notebooks.EXTRA_NOTEBOOKS
             if solutions or name != SOLUTIONS]
    failure: notebooks.NotebookError | None = None
    ran: list[str] = []
    reused: list[str] = []
    started = time.time()
    if execute:
        from digitserve.server import stop_run_dir

        try:
            for name in names:
                try:
                    if is_current(Path(executed_dir) / name, quick):
                        reused.append(name)
                    else:
                        notebooks.run_notebook(name, quick, out_dir=executed_dir)
                finally:
                    ran.append(name)
        except notebooks.NotebookError as err:
            failure = err
        finally:
            stop_run_dir(config.RUN_DIR)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("*.html"):  # a page left from an earlier report (solutions...)
        old.unlink()
    pages = []
    for name in names:
        executed = Path(executed_dir) / name
        if (execute and name not in ran) or not executed.is_file():
            pages.append(Page(name, name, "not run"))
        else:
            pages.append(render_notebook(executed, out_dir))
    index = write_index(pages, out_dir, quick=quick, wall_s=time.time() - started,
                        reused=len(reused))
    if failure is not None:
        raise notebooks.NotebookError(f"{failure}\nThe report so far: {index}")
    return index


def is_current(executed: Path, quick: bool) -> bool:
    """Whether ``executed`` ran without error, at this setting, after its source last changed.

    ``make demo`` then ``make report`` renders the demo's notebooks instead of running them again.
    """
    source = notebooks.NOTEBOOKS_DIR / executed.name
    if not executed.is_file() or executed.stat().st_mtime < source.stat().st_mtime:
        return False
    nb = nbformat.read(executed, as_version=4)
    parameters = nb.metadata.get("papermill", {}).get("parameters", {})
    return parameters.get("QUICK") == quick and not _error(nb)


def render_notebook(executed: Path, out_dir: Path) -> Page:
    """Write ``<out_dir>/<stem>.html`` for one executed notebook and describe it for the index."""
    nb = nbformat.read(executed, as_version=4)
    nb.metadata.pop("widgets", None)  # widget state needs scripts from a CDN to show
    title = _title(nb, executed.stem)
    run = nb.metadata.get("papermill", {})
    duration = run.get("duration")
    error = _error(nb)
    figures = [output["data"]["image/png"] for cell in nb.cells if cell.cell_type == "code"
               for output in cell.get("outputs", []) if "image/png" in output.get("data", {})]
    parameters = run.get("parameters", {})
    note = (f"{html.escape(title)} &middot; executed {html.escape(str(run.get('end_time', '?')))}"
            f" with {html.escape(', '.join(f'{k} = {v}' for k, v in parameters.items()))}"
            + (f" in {duration:.0f} s" if duration else "")
            + (f" &middot; <b>failed: {html.escape(error)}</b>" if error else ""))
    exporter = HTMLExporter(template_name="lab", extra_loaders=[DictLoader(
        {_TEMPLATE_NAME: _OFFLINE_TEMPLATE})], template_file=_TEMPLATE_NAME, embed_images=True)
    # One line per progress bar (its last state), not one per update.
    exporter.register_preprocessor(CoalesceStreamsPreprocessor(), enabled=True)
    body, _ = exporter.from_notebook_node(nb, resources={
        "metadata": {"name": title}, "ds_note": note,
        "ds_nav_class": "ds-failed" if error else "",
    })
    page = Path(out_dir) / f"{executed.stem}.html"
    page.write_text(body, encoding="utf-8")
    return Page(executed.name, title, "failed" if error else "ran", page, duration, len(figures),
                error, figures[0].replace("\n", "") if figures else "")


def write_index(pages: list[Page], out_dir: Path, quick: bool, wall_s: float,
                reused: int = 0) -> Path:
    """``index.html``: one row per notebook, with its status, time, figures and first figure."""
    rows = []
    for number, page in enumerate(pages, 1):
        name = html.escape(page.title)
        link = f'<a href="{page.html.name}">{name}</a>' if page.html else name
        thumb = (f'<img alt="first figure" src="data:image/png;base64,{page.thumbnail}">'
                 if page.thumbnail else "")
        status = {"ran": "✓ ran", "failed": f"✗ failed: {html.escape(page.error)}",
                  "not run": "not run (an earlier notebook failed, or never executed)"}
        rows.append(
            f'<tr class="{page.status.replace(" ", "-")}"><td>{number}</td>'
            f"<td>{link}<br><code>{html.escape(page.name)}</code></td>"
            f"<td>{status[page.status]}</td>"
            f"<td class=\"time\">{_duration(page.duration_s)}</td>"
            f"<td>{page.figures}</td><td>{thumb}</td></tr>"
        )
    training = _metrics("01_train")
    accuracy = (f"; test accuracy after training: {training['test_accuracy']:.2%}"
                if "test_accuracy" in training else "")
    failed = sum(page.status != "ran" for page in pages)
    rendered = (f": {reused} of the notebooks had already run at this setting since their last "
                "change (e.g. in <code>make demo</code>), so their pages show that run"
                if reused else "")
    summary = (f"{len(pages) - failed} of {len(pages)} notebooks ran"
               + (f", <b>{failed} did not</b>" if failed else ""))
    text = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1.0">
<title>digitserve: the notebooks, executed</title>
<style>
body {{ font: 15px/1.5 system-ui, sans-serif; max-width: 1100px; margin: 24px auto;
        padding: 0 16px; color: #1f2328; }}
table {{ border-collapse: collapse; width: 100%; }}
th, td {{ border-bottom: 1px solid #d0d7de; padding: 8px; text-align: left;
          vertical-align: middle; }}
th {{ background: #f4f6f8; }}
td.time {{ white-space: nowrap; }}
td img {{ max-height: 110px; max-width: 320px; border: 1px solid #d0d7de; }}
tr.failed td, tr.not-run td {{ background: #fdecea; }}
a {{ color: #0b62a3; font-weight: bold; }}
.meta {{ color: #57606a; }}
</style></head><body>
<h1>digitserve: the notebooks, executed</h1>
<p class="meta">{time.strftime("%Y-%m-%d %H:%M")} on {html.escape(platform.node())}
({platform.system()}, Python {platform.python_version()}), setting
<b>{"QUICK = True" if quick else "QUICK = False (the full lessons)"}</b>;
{summary}{accuracy}. This report took {wall_s / 60:.0f} min{rendered}.</p>
<p>Each page is the notebook as it ran here, its figures included; it opens offline.
Run it yourself: <code>make lab</code>, or rebuild this report with <code>make report</code>.</p>
<table><tr><th>#</th><th>notebook</th><th>status</th><th>time</th><th>figures</th>
<th>first figure</th></tr>
{"".join(rows)}
</table></body></html>
"""
    index = Path(out_dir) / "index.html"
    index.write_text(text, encoding="utf-8")
    return index


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes} min {seconds:02d} s" if minutes else f"{seconds} s"


def _title(nb: nbformat.NotebookNode, default: str) -> str:
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            for line in cell.source.splitlines():
                if line.startswith("# "):
                    return line[2:].strip()
    return default


def _error(nb: nbformat.NotebookNode) -> str:
    """``Name: message`` of the first error output, or ``""``."""
    for cell in nb.cells:
        for output in cell.get("outputs", []) if cell.cell_type == "code" else []:
            if output.get("output_type") == "error":
                return f"{output['ename']}: {output['evalue']}"[:300]
    return ""


def _metrics(stem: str) -> dict:
    try:
        return notebooks.read_metrics(stem)
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
