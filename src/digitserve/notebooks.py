"""Run the lesson notebooks head-less with papermill, and keep the figures each one records.

Each notebook's ``parameters`` cell starts with ``QUICK = False``; papermill injects the
override (``QUICK = True`` for the short setting) in a cell right after it. The executed copy
goes to ``build/notebooks/`` and the notebook's last cell writes ``build/metrics/<stem>.json``,
which the tests read.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from digitserve import config

NOTEBOOKS_DIR = config.PROJECT_ROOT / "notebooks"
#: The lessons in the order they must run: each uses what the one before it made.
NOTEBOOKS = (
    "01_train.ipynb",
    "02_archive.ipynb",
    "03_serve.ipynb",
    "04_grpc_client.ipynb",
    "05_robust_serving.ipynb",
    "06_versions_and_workers.ipynb",
    "07_streaming_and_oip.ipynb",
    "08_why_grpc.ipynb",
    "09_beyond_one_machine.ipynb",
)
#: Workshop notebooks, run after the lessons (they need the archive notebook 02 makes):
#: the exercises as learners get them, and the same with the solutions filled in.
EXTRA_NOTEBOOKS = ("exercises.ipynb", "solutions.ipynb")
#: Set on every head-less run of a notebook whose parameters cell has them: nobody can draw.
HEADLESS_PARAMETERS = {"INTERACTIVE": False}
#: The kernel installed with the kit's environment; a user's own "python3" may lack the package.
KERNEL_NAME = "digitserve"
#: Per-cell time limits: papermill has none by default, so a hung cell would wait for ever.
#: The full setting's training cell is the longest: about 10 minutes on a 2-core CPU.
QUICK_CELL_TIMEOUT_S = 1800
FULL_CELL_TIMEOUT_S = 2 * 3600


class NotebookError(RuntimeError):
    """A notebook failed; the message names the cell, the error and the executed copy."""


def run_notebook(
    name: str,
    quick: bool,
    out_dir: Path = config.NOTEBOOKS_OUT_DIR,
    timeout_s: float | None = None,
) -> Path:
    """Execute ``notebooks/<name>`` with ``QUICK = quick``; return the executed copy's path.

    ``timeout_s`` limits every cell (default: 15 min quick, 2 h full).
    """
    # The kit's kernelspec lives in its environment; without this, one of the same name in
    # the user's ~/.local/share/jupyter would win and run another Python.
    os.environ["JUPYTER_PREFER_ENV_PATH"] = "1"
    # Kernels started from here draw text progress bars (see digitserve.progress).
    os.environ["DIGITSERVE_HEADLESS"] = "1"
    _check_kernel()
    source = NOTEBOOKS_DIR / name
    if not source.is_file():
        raise FileNotFoundError(f"no notebook {source}; the notebooks are "
                                f"{', '.join(NOTEBOOKS + EXTRA_NOTEBOOKS)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    output = out_dir / name
    if timeout_s is None:
        timeout_s = QUICK_CELL_TIMEOUT_S if quick else FULL_CELL_TIMEOUT_S
    import papermill  # here, not at the top: every notebook imports this module, and papermill
    # (through nbformat's schema checks) costs seconds to import that a lesson need not wait

    try:
        papermill.execute_notebook(
            str(source),
            str(output),
            parameters=notebook_parameters(source, quick),
            kernel_name=KERNEL_NAME,
            execution_timeout=timeout_s,
            cwd=str(NOTEBOOKS_DIR),
            progress_bar=True,
        )
    except papermill.PapermillExecutionError as err:
        raise NotebookError(
            f"{name} failed in cell {err.exec_count}: {err.ename}: {err.evalue}\n"
            f"The executed copy, with the error in it, is {output}."
        ) from err
    return output


def run_all(quick: bool, out_dir: Path = config.NOTEBOOKS_OUT_DIR,
            timeout_s: float | None = None, extras: bool = False) -> list[Path]:
    """Run every lesson in order (then the workshop notebooks if ``extras``); stop at a failure."""
    names = NOTEBOOKS + (EXTRA_NOTEBOOKS if extras else ())
    return [run_notebook(name, quick, out_dir, timeout_s) for name in names]


def durations(executed: list[Path]) -> dict[str, float]:
    """Seconds each executed notebook took to run, from papermill's record in the notebook."""
    seconds = {}
    for path in executed:
        metadata = json.loads(Path(path).read_text()).get("metadata", {}).get("papermill", {})
        if metadata.get("duration") is not None:
            seconds[Path(path).name] = float(metadata["duration"])
    return seconds


def time_table(executed: list[Path]) -> str:
    """A Markdown table of each notebook's time, and the total (the README's, from a demo)."""
    seconds = durations(executed)
    rows = [f"| `{name}` | {value / 60:.1f} min |" for name, value in seconds.items()]
    total = sum(seconds.values())
    return "\n".join(["| notebook | time |", "|---|---:|", *rows,
                      f"| **all {len(seconds)}** | **{total / 60:.1f} min** |"])


def notebook_parameters(source: Path, quick: bool) -> dict:
    """``QUICK``, plus the head-less settings the notebook's parameters cell declares."""
    import papermill

    declared = papermill.inspect_notebook(str(source))
    return {"QUICK": quick, **{name: value for name, value in HEADLESS_PARAMETERS.items()
                               if name in declared}}


def record_metrics(
    notebook_name: str,
    metrics: dict,
    quick: bool | None = None,
    metrics_dir: Path = config.METRICS_DIR,
) -> Path:
    """Write ``<metrics_dir>/<stem>.json``: the figures a notebook's test checks.

    The interpreter that ran the notebook and the time are added, so a test can tell a fresh
    file written by the kit's kernel from a stale one or one written by another Python.
    """
    record = {**metrics, "python": sys.executable, "recorded_at": time.time()}
    if quick is not None:
        record["quick"] = quick
    path = Path(metrics_dir) / f"{Path(notebook_name).stem}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, default=str))
    return path


def read_metrics(stem: str, metrics_dir: Path = config.METRICS_DIR) -> dict:
    """The metrics a notebook recorded, e.g. ``read_metrics("01_train")``."""
    path = Path(metrics_dir) / f"{Path(stem).stem}.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"no metrics at {path}: run notebooks/{Path(stem).stem}.ipynb first "
            "(or `digitserve.notebooks.run_notebook`)."
        )
    return json.loads(path.read_text())


def _check_kernel() -> None:
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        KernelSpecManager().get_kernel_spec(KERNEL_NAME)
    except NoSuchKernel:
        raise NotebookError(
            f"the Jupyter kernel {KERNEL_NAME!r} is not installed: run `make env`, or "
            f"`{sys.executable} -m ipykernel install --sys-prefix --name {KERNEL_NAME} "
            "--display-name 'Python (digitserve)'`."
        ) from None


def readme_section(title: str, readme: Path = config.PROJECT_ROOT / "README.md") -> str:
    """The Markdown of one ``## title`` section of the README, to show in a notebook: the README
    holds the text once (e.g. TorchServe's status, shown in notebooks 03 and 09)."""
    text = Path(readme).read_text()
    start = text.find(f"\n## {title}\n")
    if start < 0:
        raise KeyError(f"no section '## {title}' in {readme}")
    end = text.find("\n## ", start + 1)
    return text[start + 1 : end if end > 0 else None].strip()
