"""What TorchServe's own logs say about the calls of one measurement.

With its built-in log4j2.xml TorchServe writes, for every request, lines the benchmark reads:

- ``ts_log.log``: ``GRPCJob - Waiting time ns: W, Backend time ns: B`` (``RestJob`` for REST):
  W is the time the request waited in the frontend's queue (and for a batch to fill), B the
  time from its dispatch to the worker until the frontend answered;
  ``WorkerThread - Backend response time: T`` (milliseconds): the round trip over the socket to
  the Python worker; ``BatchAggregator - Sending response for jobId <id>``: the worker answered
  that request; ``GRPCJob - grpc client call already cancelled, not able to send this response
  for requestId: <id>``: it answered a call whose caller had already given up.
- ``model_metrics.log``: ``PredictionTime.ms:P``: the handler's whole ``handle`` for a batch.

``LogWindow`` remembers where the logs ended, so that only the lines of one measurement count.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

TS_LOG = "logs/ts_log.log"
MODEL_METRICS = "logs/model_metrics.log"
JOB_TIMES = re.compile(r"(GRPCJob|RestJob) - Waiting time ns: (\d+), Backend time ns: (\d+)")
BACKEND = re.compile(r"WorkerThread - Backend response time: (\d+)")
PREDICTION = re.compile(r"PredictionTime\.ms:([\d.]+)")
ANSWERED = re.compile(r"Sending response for jobId ([0-9a-f-]+)")
DROPPED = re.compile(r"not able to send this response for requestId: ([0-9a-f-]+)")


@dataclass
class LogWindow:
    """The lines TorchServe adds to its logs in ``run_dir`` from now on."""

    run_dir: Path
    offsets: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.run_dir = Path(self.run_dir)
        self.offsets = {name: self._size(name) for name in (TS_LOG, MODEL_METRICS)}

    def _size(self, name: str) -> int:
        path = self.run_dir / name
        return path.stat().st_size if path.is_file() else 0

    def text(self, name: str) -> str:
        path = self.run_dir / name
        if not path.is_file():
            return ""
        with open(path, "rb") as log:
            log.seek(self.offsets.get(name, 0))
            return log.read().decode(errors="replace")


def trimmed_mean(values: list[float], cut: float = 0.1) -> float | None:
    """The mean of the middle 80 % (robust to stray slow calls, fine for whole milliseconds)."""
    if not values:
        return None
    ordered = np.sort(np.asarray(values, dtype=float))
    k = int(len(ordered) * cut)
    middle = ordered[k:len(ordered) - k] if len(ordered) > 2 * k else ordered
    return round(float(middle.mean()), 3)


def timings(window: LogWindow) -> dict:
    """Per-request times TorchServe logged in the window, as trimmed means in milliseconds.

    Duplicated lines (TorchServe's default configuration writes many lines twice, through
    their own logger and the root logger) are counted once.
    """
    ts_lines = list(dict.fromkeys(window.text(TS_LOG).splitlines()))
    waits, backends, responses = [], [], []
    for line in ts_lines:
        if match := JOB_TIMES.search(line):
            waits.append(int(match.group(2)) / 1e6)
            backends.append(int(match.group(3)) / 1e6)
        elif match := BACKEND.search(line):
            responses.append(float(match.group(1)))
    metric_lines = dict.fromkeys(window.text(MODEL_METRICS).splitlines())
    predictions = [float(m.group(1)) for line in metric_lines if (m := PREDICTION.search(line))]
    return {
        "requests_logged": len(waits),
        "queue_ms": trimmed_mean(waits),
        "in_frontend_ms": trimmed_mean([w + b for w, b in zip(waits, backends, strict=True)]),
        "worker_round_trip_ms": trimmed_mean(responses),
        "handler_ms": trimmed_mean(predictions),
    }


def worker_answers(window: LogWindow) -> dict:
    """Requests the worker answered in the window, and those it answered for nobody."""
    text = window.text(TS_LOG)
    return {"answered": len(set(ANSWERED.findall(text))),
            "answered_after_cancel": len(set(DROPPED.findall(text)))}


def log_bytes(run_dir: Path) -> int:
    """Bytes TorchServe has written to its logs in ``run_dir`` so far."""
    files = [*Path(run_dir).glob("logs/*.log"), Path(run_dir) / "torchserve.out"]
    return sum(path.stat().st_size for path in files if path.is_file())
