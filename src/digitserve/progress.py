"""Progress bars that read well both in JupyterLab and in executed (papermill) notebooks.

In JupyterLab a widget bar is nicest, but an executed notebook saves a widget without its
final state, so it shows "0%" for ever. ``notebooks.run_notebook`` sets ``DIGITSERVE_HEADLESS``
for the kernels it starts; then bars are plain text, updated every few seconds, and go to
stdout: an executed notebook shows stderr in red, and a progress bar is no warning.
"""

from __future__ import annotations

import os
import sys

from tqdm import tqdm as text_tqdm
from tqdm.auto import tqdm as auto_tqdm

HEADLESS = os.environ.get("DIGITSERVE_HEADLESS") == "1"


def progress(*args, **kwargs) -> text_tqdm:
    """``tqdm(...)``: a widget in a live notebook, text on stdout every 5 s in a headless one."""
    if HEADLESS:
        kwargs.setdefault("mininterval", 5.0)
        kwargs.setdefault("file", sys.stdout)
        return text_tqdm(*args, **kwargs)
    return auto_tqdm(*args, **kwargs)
