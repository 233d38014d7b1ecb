"""Progress bars that read well both in JupyterLab and in executed (papermill) notebooks.

In JupyterLab a widget bar is nicest, but an executed notebook saves a widget without its
final state, so it shows "0%" for ever. ``notebooks.run_notebook`` sets ``DIGITSERVE_HEADLESS``
for the kernels it starts; then bars are plain text, updated every few seconds, and go to
stdout: an executed notebook shows stderr in red, and a progress bar is no warning.

Each refresh of a text bar is one more output line saved in the executed notebook, so a bar
refreshes only on its own clock (``mininterval``): update a postfix with ``refresh=False``
(``set_postfix(..., refresh=False)``), never once per item.
"""

from __future__ import annotations

import os
import sys

from tqdm import tqdm as text_tqdm
from tqdm.auto import tqdm as auto_tqdm

#: Seconds between two refreshes of a text bar in a head-less run.
HEADLESS_INTERVAL_S = 5.0
#: Seconds between two refreshes of a widget bar in JupyterLab (each one is a message to it).
LIVE_INTERVAL_S = 0.5


def headless() -> bool:
    """True where nobody watches the notebook live: ``DIGITSERVE_HEADLESS=1``.

    The one place the kit reads that variable. It is read at each call, so a kernel (or a test)
    that sets it later is obeyed.
    """
    return os.environ.get("DIGITSERVE_HEADLESS") == "1"


#: ``headless()`` when this module was imported; callers should prefer the function.
HEADLESS = headless()


def progress(*args, **kwargs) -> text_tqdm:
    """``tqdm(...)``: a widget in a live notebook, text on stdout every 5 s in a headless one."""
    if headless():
        kwargs.setdefault("mininterval", HEADLESS_INTERVAL_S)
        kwargs.setdefault("file", sys.stdout)
        return text_tqdm(*args, **kwargs)
    kwargs.setdefault("mininterval", LIVE_INTERVAL_S)
    return auto_tqdm(*args, **kwargs)
