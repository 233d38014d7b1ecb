"""The live drawing pad as a learner uses it: JupyterLab in headless Chromium, a digit drawn with
the mouse, the answer after every stroke read from the page.

It starts JupyterLab on a free loopback port with a generated token and the kit's kernel, opens
a copy of notebooks/07_streaming_and_oip.ipynb, runs its cells down to the pad with Shift+Enter,
draws the scripted 5 stroke by stroke with the mouse, reads the per-stroke answers and the
prediction from the page, saves a screenshot under the isolated build folder, then runs the rest
of the notebook (which stops its server) and checks the notebook's recorded figures. It also
checks that JupyterLab, with the settings ``make env`` installs, asks nothing about Jupyter news.

Chromium is Debian's (``apt-get install chromium``; ``.ci/run`` installs it), driven by
Playwright's Python package with ``executable_path``; Playwright's own browser download is not
used. Without Chromium or Playwright the test is skipped and says how to get them.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import nbformat
import psutil
import pytest
from conftest import isolate_kit

from digitserve import archive, live, notebooks
from digitserve.config import PROJECT_ROOT

pytestmark = pytest.mark.notebook

NOTEBOOK = notebooks.NOTEBOOKS_DIR / "07_streaming_and_oip.ipynb"
CHROMIUM = Path("/usr/bin/chromium")
#: What Chromium needs here: no sandbox (root, containers), no GPU, no calls home.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]
#: The JupyterLab settings ``make env`` installs into the environment (no news prompt).
LAB_OVERRIDES = PROJECT_ROOT / "jupyterlab" / "overrides.json5"
PORT_OFFSETS = range(20000, 24000, 100)
#: Cells that start TorchServe or measure take long on a busy 2-core machine.
SLOW_S = 900


@dataclass
class Lab:
    url: str
    token: str
    root: Path
    notebook: Path
    process: subprocess.Popen


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def kit_processes(run_dir: Path) -> list[psutil.Process]:
    """Kernels and TorchServe processes of this test's kit (they carry its run directory)."""
    found = []
    for proc in psutil.process_iter(["environ", "cmdline"]):
        environ = proc.info["environ"] or {}
        if proc.pid == os.getpid():
            continue
        if (environ.get("DIGITSERVE_RUN_DIR") == str(run_dir)
                or environ.get("TMPDIR", "").startswith(str(run_dir))):
            found.append(proc)
    return found


@pytest.fixture
def chromium():
    """Playwright's sync API, or a skip that says how to get Chromium and Playwright."""
    if not CHROMIUM.is_file():
        pytest.skip(f"no Chromium at {CHROMIUM}: install Debian's package with "
                    "`apt-get install chromium` (.ci/run does it when run as root); "
                    "Playwright's own browser download is not used")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the browser test needs Playwright's Python package: `make env` installs "
                    "it (the dev extras), or `.venv/bin/pip install playwright==1.65.2`")
    return sync_playwright


@pytest.fixture
def lab(tmp_path: Path, model_store: Path):
    """JupyterLab on a free loopback port, token auth, the kit's kernel, an isolated kit."""
    store = tmp_path / "model_store"
    store.mkdir()
    shutil.copy(model_store / f"{archive.ARCHIVE_NAME}.mar", store)
    patch = isolate_kit(tmp_path, store, PORT_OFFSETS)
    folder = tmp_path / "notebooks"
    folder.mkdir()
    notebook = folder / NOTEBOOK.name  # a copy: what the browser runs never touches the repo
    shutil.copy(NOTEBOOK, notebook)
    settings = tmp_path / "lab-settings"
    (settings / "overrides.d").mkdir(parents=True)
    shutil.copy(LAB_OVERRIDES, settings / "overrides.d" / "digitserve.json5")
    port, token = free_port(), secrets.token_urlsafe(24)
    env = {**os.environ, "JUPYTER_PREFER_ENV_PATH": "1",
           "JUPYTER_CONFIG_DIR": str(tmp_path / "jupyter-config"),
           "JUPYTER_RUNTIME_DIR": str(tmp_path / "jupyter-runtime"),
           "JUPYTERLAB_SETTINGS_DIR": str(tmp_path / "lab-user-settings"),
           "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "lab-workspaces")}
    env.pop("DIGITSERVE_HEADLESS", None)  # a person draws here
    command = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1",
               f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
               f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={folder}",
               f"--LabApp.app_settings_dir={settings}",
               # A busy machine may take over a minute to start a kernel (the default limit).
               "--MappingKernelManager.kernel_info_timeout=600",
               "--ZMQChannelsWebsocketConnection.kernel_info_timeout=600"]
    if os.geteuid() == 0:  # as `make lab` does, and only as root
        command.append("--allow-root")
    log = open(tmp_path / "jupyterlab.log", "wb")  # noqa: SIM115 - closed at teardown
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=5):
                    break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail("JupyterLab did not start:\n"
                                + (tmp_path / "jupyterlab.log").read_text()[-3000:])
                time.sleep(1)
        yield Lab(url, token, tmp_path, notebook, process)
    finally:
        process.send_signal(signal.SIGTERM)  # JupyterLab shuts its kernels down, then exits
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()
        deadline = time.monotonic() + 30
        while (left := kit_processes(tmp_path / "run")) and time.monotonic() < deadline:
            time.sleep(0.5)
        for proc in left:
            proc.kill()
        patch.undo()
        assert not left, f"processes outlived JupyterLab: {[p.pid for p in left]}"


def test_live_drawing_pad_in_a_real_browser(lab: Lab, chromium, tmp_path: Path) -> None:
    cells = nbformat.read(lab.notebook, as_version=4).cells
    pad = next(i for i, cell in enumerate(cells) if "live_drawing_pad(" in cell.source)
    screenshot = lab.root / "build" / "browser" / "07_live_drawing.png"
    screenshot.parent.mkdir(parents=True)
    from playwright.sync_api import expect

    with chromium() as playwright:
        browser = playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=str(CHROMIUM), headless=True,
            args=CHROMIUM_FLAGS, viewport={"width": 1400, "height": 1000})
        try:
            page = browser.new_page()
            page.set_default_timeout(SLOW_S * 1000)
            page.goto(f"{lab.url}/lab/tree/{lab.notebook.name}?token={lab.token}")
            notebook_cells = page.locator(".jp-NotebookPanel .jp-Notebook .jp-Cell")
            expect(notebook_cells).to_have_count(len(cells), timeout=SLOW_S * 1000)
            # The kernel is up (the toolbar's status, read out to screen readers).
            page.get_by_text("Kernel status: Idle").first.wait_for(state="attached")
            run_cells(page, cells, 0, pad)  # as a learner does: Shift+Enter down to the pad
            canvas = page.locator("canvas.digitserve-canvas")
            canvas.wait_for()
            canvas.scroll_into_view_if_needed()
            box = canvas.bounding_box()
            border = 2  # the canvas's CSS border: points are offsets inside it
            drawing = live.scripted_drawing()
            answers = page.locator("ol.digitserve-live-answers li")
            for n, points in enumerate(drawing, start=1):
                (x, y), *rest = [(box["x"] + border + px, box["y"] + border + py)
                                 for px, py in points]
                page.mouse.move(x, y)
                page.mouse.down()
                for x, y in rest:
                    page.mouse.move(x, y, steps=2)
                page.mouse.up()
                answers.nth(n - 1).wait_for(timeout=120_000)
            items = [(li.get_attribute("data-digit"), li.inner_text()) for li in answers.all()]
            status = page.locator(".digitserve-live-status[data-digit]")
            final_digit = status.get_attribute("data-digit")
            page.locator(".digitserve-live-answers").scroll_into_view_if_needed()
            page.screenshot(path=str(screenshot))
            news_prompts = page.get_by_text("official Jupyter news").count()
            # Then the rest of the notebook: it measures, and its last cell stops the server.
            run_cells(page, cells, pad + 1, len(cells) - 1)
            metrics_file = lab.root / "build" / "metrics" / "07_streaming_and_oip.json"
            deadline = time.monotonic() + SLOW_S
            while not metrics_file.is_file() and time.monotonic() < deadline:
                time.sleep(1)
            news_prompts += page.get_by_text("official Jupyter news").count()
        finally:
            browser.close()
    print(f"screenshot: {screenshot}")
    assert news_prompts == 0, "JupyterLab asked about Jupyter news"
    assert len(items) == len(drawing), items
    for n, (digit, text) in enumerate(items, start=1):
        assert digit is not None and 0 <= int(digit) <= 9, text
        sent, png = _bytes(text, n)
        assert sent < png, text  # the stroke, not the canvas
    assert final_digit == items[-1][0]
    assert screenshot.is_file() and screenshot.stat().st_size > 10_000
    assert metrics_file.is_file(), "the notebook did not reach its last cell"
    metrics = json.loads(metrics_file.read_text())
    assert metrics["interactive"] is True and metrics["stopped"] is True
    assert len(metrics["live_drawing"]["answers"]) == metrics["live_drawing"]["strokes"]


def run_cells(page, cells: list, first: int, last: int) -> None:
    """Select cell ``first`` and press Shift+Enter through ``last``, each code cell waited for
    (its prompt shows an execution count) and failed on a traceback."""
    from playwright.sync_api import expect

    shown = page.locator(".jp-NotebookPanel .jp-Notebook .jp-Cell")
    shown.nth(first).locator(".jp-InputPrompt").click()
    page.keyboard.press("Escape")  # command mode: Shift+Enter runs the cell and moves on
    for index in range(first, last + 1):
        page.keyboard.press("Shift+Enter")
        if cells[index].cell_type != "code":
            continue
        cell = shown.nth(index)
        expect(cell.locator(".jp-InputPrompt")).to_have_text(re.compile(r"\[\d+\]"),
                                                            timeout=SLOW_S * 1000)
        outputs = "\n".join(cell.locator(".jp-OutputArea-output").all_inner_texts())
        assert "Traceback" not in outputs, f"cell {index} failed:\n{outputs[-3000:]}"


def _bytes(text: str, stroke: int) -> tuple[int, int]:
    """The bytes a stroke took and the size of the canvas as PNG, from one line of the pad."""
    match = re.search(r"stroke (\d+): .*?([\d,]+) bytes sent.*PNG: ([\d,]+) bytes", text)
    assert match and int(match.group(1)) == stroke, text
    return int(match.group(2).replace(",", "")), int(match.group(3).replace(",", ""))
