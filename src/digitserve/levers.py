"""What makes training fast here: the levers measured, saved in ``training_levers.json``.

Two kinds of measurement, both kept in the JSON file beside this module (package data, so
notebook 01 shows them without measuring for minutes):

- ``step_costs``: the CPU time of one training step per image, for each lever against the same
  baseline, measured in interleaved rounds (baseline, lever, baseline, lever, ...) so that a
  machine whose load changes treats every variant alike. Process CPU time, not wall time: on a
  shared machine wall time mostly measures the other users.
- ``full_runs``: whole training runs (``train.train``) with the accuracy each one reached on
  the 10,000 test images, per seed, with CPU and wall time and the load average while it ran.

``python -m digitserve.levers`` measures the step costs again (a few minutes) and rewrites them.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from IPython.display import Markdown
from torch import nn

from digitserve.data import load_normalized
from digitserve.model import DigitCNN
from digitserve.preprocessing import IMAGE_SIZE, to_model_input

LEVERS_PATH = Path(__file__).with_name("training_levers.json")

#: Each lever: what it changes against the baseline (the keyword arguments of ``step_fn``),
#: and what ``train.FULL`` does about it (words only: the numbers come from the measurements).
STEP_LEVERS: dict[str, tuple[dict, str]] = {
    "baseline: channels_last, fused AdamW, batch 128, resize every batch": (
        {}, "what train.FULL does"),
    "contiguous (NCHW) memory instead of channels_last": (
        {"channels_last": False}, "kept channels_last"),
    "AdamW's default (a Python loop over parameters) instead of fused": (
        {"optimizer": "loop"}, "kept fused"),
    "AdamW foreach instead of fused": ({"optimizer": "foreach"}, "kept fused"),
    "inputs cached as 3×96×96 tensors (no resize per batch)": (
        {"cached": True}, "not used: with augmentation every epoch sees new inputs, and a cache "
        "of 60,000 inputs takes gigabytes"),
    "augmentation (rotation, shift, zoom) of every batch": (
        {"augmented": True}, "used; at 1.6 epochs and max_lr 3e-3 the full runs with and "
        "without it came out alike"),
    "the centred 80×80 square of each 96×96 input (a crop; the digit keeps its size)": (
        {"crop": 80}, "not used: in the full runs below, cropping the first 75 % of the steps "
        "cost accuracy against the same steps and seed without it"),
    "batch 64": ({"batch_size": 64}, "batch 128 kept"),
    "batch 256": ({"batch_size": 256}, "batch 128 kept"),
    "bf16 autocast (this CPU has no native bf16)": ({"bf16": True}, "not used"),
}


def step_fn(digits: torch.Tensor, labels: torch.Tensor, batch_size: int = 128,
            channels_last: bool = True, optimizer: str = "fused", cached: bool = False,
            augmented: bool = False, bf16: bool = False, compiled: bool = False,
            crop: int = IMAGE_SIZE) -> Callable[[], None]:
    """One training step of DigitCNN on the next batch, with the lever's changes."""
    from digitserve.train import augment, center_crop

    layout = torch.channels_last if channels_last else torch.contiguous_format
    model = DigitCNN().to(memory_format=layout)
    options = {"fused": {"fused": True}, "foreach": {"foreach": True}, "loop": {"foreach": False}}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05, **options[optimizer])
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    forward = torch.compile(model) if compiled else model
    batches = len(digits) // batch_size
    inputs = ([to_model_input(digits[i * batch_size:(i + 1) * batch_size]).contiguous(
        memory_format=layout) for i in range(batches)] if cached else None)
    state = {"i": -1}

    def step() -> None:
        i = state["i"] = (state["i"] + 1) % batches
        chunk = slice(i * batch_size, (i + 1) * batch_size)
        if cached:
            batch = inputs[i]
        else:
            raw = augment(digits[chunk]) if augmented else digits[chunk]
            batch = center_crop(to_model_input(raw), crop).contiguous(memory_format=layout)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = forward(batch)
        loss = loss_fn(logits.float(), labels[chunk])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def measure_step_costs(levers: Mapping[str, tuple[dict, str]] = STEP_LEVERS, rounds: int = 5,
                       images: int = 768, threads: int = 1, n_digits: int = 2048) -> list[dict]:
    """CPU milliseconds per training image for each lever, interleaved with the first (baseline).

    One thread: OpenMP threads spin while they wait for each other, so with two threads on a
    busy machine CPU time measures the waiting too. Ratios carry over to two threads.
    """
    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    digits, labels = load_normalized(train=True)
    digits, labels = digits[:n_digits], labels[:n_digits]
    steps = {}
    for name, (changes, _) in levers.items():
        steps[name] = step_fn(digits, labels, **changes)
        steps[name]()  # the first step allocates and picks kernels: not measured
    batch_size = {name: levers[name][0].get("batch_size", 128) for name in levers}
    cpu_ms: dict[str, list[float]] = {name: [] for name in levers}
    wall_ms: dict[str, list[float]] = {name: [] for name in levers}
    loads = []
    for _ in range(rounds):
        loads.append(os.getloadavg()[0])
        for name, step in steps.items():
            n_steps = max(1, images // batch_size[name])
            cpu, wall = time.process_time(), time.perf_counter()
            for _ in range(n_steps):
                step()
            per_image = n_steps * batch_size[name] / 1000
            cpu_ms[name].append((time.process_time() - cpu) / per_image)
            wall_ms[name].append((time.perf_counter() - wall) / per_image)
    torch.set_num_threads(threads_before)
    baseline = next(iter(levers))
    rows = []
    for name in levers:
        ratios = [mine / base for mine, base in zip(cpu_ms[name], cpu_ms[baseline], strict=True)]
        rows.append({"lever": name, "decision": levers[name][1],
                     "cpu_ms_per_image": statistics.median(cpu_ms[name]),
                     "wall_ms_per_image": statistics.median(wall_ms[name]),
                     "cpu_ratio": statistics.median(ratios), "ratio_range": [min(ratios),
                                                                             max(ratios)],
                     "rounds": rounds, "threads": threads,
                     "load_average": [min(loads), max(loads)]})
    return rows


def measure_compile(rounds: int = 5, threads: int = 1) -> dict:
    """``torch.compile`` for training: the time its first steps take, then its step cost.

    The compiler's own worker processes are not counted in this process's CPU time, so the
    first steps' wall time is recorded too.
    """
    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads)
    digits, labels = load_normalized(train=True)
    digits, labels = digits[:2048], labels[:2048]
    eager = step_fn(digits, labels)
    eager()
    cpu, wall = time.process_time(), time.perf_counter()
    compiled = step_fn(digits, labels, compiled=True)
    compiled()
    compiled()
    first = {"first_steps_cpu_s": time.process_time() - cpu,
             "first_steps_wall_s": time.perf_counter() - wall}
    ratios = []
    for _ in range(rounds):
        costs = []
        for step in (eager, compiled):
            cpu = time.process_time()
            for _ in range(3):
                step()
            costs.append(time.process_time() - cpu)
        ratios.append(costs[1] / costs[0])
    torch.set_num_threads(threads_before)
    return {**first, "cpu_ratio": statistics.median(ratios), "ratio_range": [min(ratios),
                                                                            max(ratios)]}


def machine() -> dict:
    """What the measurements ran on."""
    return {"processor": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def load(path: Path = LEVERS_PATH) -> dict:
    """The saved measurements."""
    return json.loads(Path(path).read_text())


def save(record: dict, path: Path = LEVERS_PATH) -> Path:
    Path(path).write_text(json.dumps(record, indent=2) + "\n")
    return Path(path)


def step_cost_table(record: dict | None = None) -> Markdown:
    """The step-cost levers as a Markdown table, cheapest first."""
    record = record or load()
    rows = sorted(record["step_costs"], key=lambda row: row["cpu_ratio"])
    lines = ["| lever | CPU ms per image | × baseline (range over rounds) | in train.FULL |",
             "|---|---:|---:|---|"]
    lines += [f"| {row['lever']} | {row['cpu_ms_per_image']:.2f} | {row['cpu_ratio']:.2f} "
              f"({row['ratio_range'][0]:.2f}–{row['ratio_range'][1]:.2f}) | {row['decision']} |"
              for row in rows]
    return Markdown("\n".join(lines))


def full_run_table(record: dict | None = None) -> Markdown:
    """Whole training runs: setting, seed, test accuracy, CPU and wall time, load."""
    record = record or load()
    lines = ["| setting | seed | test accuracy | CPU time | wall time | load average |",
             "|---|---:|---:|---:|---:|---:|"]
    for row in record["full_runs"]:
        lines.append(f"| {row['setting']} | {row['seed']} | {100 * row['test_accuracy']:.2f} % | "
                     f"{row['cpu_time_s'] / 60:.1f} min | {row['wall_time_s'] / 60:.1f} min | "
                     f"{row['load_average'][0]:.0f}–{row['load_average'][1]:.0f} |")
    return Markdown("\n".join(lines))


def summary(record: dict | None = None) -> Markdown:
    """Which levers won and which lost, with their measured effect, and the setting chosen."""
    from digitserve.train import FULL

    record = record or load()
    lines = []
    for row in sorted(record["step_costs"], key=lambda row: row["cpu_ratio"]):
        if row["lever"].startswith("baseline"):
            continue
        saving = 1 / row["cpu_ratio"] - 1
        if row["cpu_ratio"] > 1.03:  # the baseline does better: the lever lost
            lines.append(f"- **{row['lever']}**: each training image costs ×{row['cpu_ratio']:.2f} "
                         f"({row['decision']}).")
        elif row["cpu_ratio"] < 0.97:
            lines.append(f"- **{row['lever']}**: ×{row['cpu_ratio']:.2f} per training image, "
                         f"{saving:.0%} more images per second ({row['decision']}).")
        else:
            lines.append(f"- **{row['lever']}**: within ±3 % of the baseline "
                         f"(×{row['cpu_ratio']:.2f}; {row['decision']}).")
    compiled = record.get("compile")
    if compiled:
        lines.append(
            f"- **torch.compile for training**: its first two steps took "
            f"{compiled['first_steps_cpu_s']:.0f} s of CPU in this process (its compiler "
            f"workers not counted) and {compiled['first_steps_wall_s'] / 60:.0f} minutes of wall "
            f"time at a load average near {compiled['load_average']:.0f}, and every step after "
            f"costs ×{compiled['cpu_ratio']:.2f} ({compiled['ratio_range'][0]:.2f}–"
            f"{compiled['ratio_range'][1]:.2f}): not used.")
    lines += learning_rate(record["full_runs"])
    chosen = [run for run in record["full_runs"] if run.get("chosen")]
    if chosen:
        share = sum(run["test_time_s"] for run in chosen) / sum(run["wall_time_s"]
                                                                 for run in chosen)
        lines.append(f"- **measuring the test set** (with BatchNorm recalibration): {share:.0%} "
                     "of the chosen runs' time, once after the last step "
                     "(`test_every_epoch=True` pays it after every epoch as well).")
    if chosen:
        accuracies = [run["test_accuracy"] for run in chosen]
        cpu = [run["cpu_time_s"] for run in chosen]
        wall = [run["wall_time_s"] for run in chosen]
        lines.append(
            f"\n**Chosen: `train.FULL`** ({FULL.epochs:g} epochs, max_lr {FULL.max_lr:g}, "
            f"augmentation {'on' if FULL.augment else 'off'}, batch {FULL.batch_size}"
            + ("" if len(FULL.crops) == 1 else ", crops " + ", ".join(
                f"{side}×{side} for {share:.0%}" for side, share in FULL.crops) + " of the steps")
            + "): over "
            f"{len(chosen)} runs (seeds {', '.join(sorted({str(run['seed']) for run in chosen}))}"
            f"; {', '.join(sorted({str(run['threads']) for run in chosen}))} torch threads) its "
            f"test accuracy was {100 * min(accuracies):.2f}–"
            f"{100 * max(accuracies):.2f} %, in {min(wall) / 60:.1f}–{max(wall) / 60:.1f} "
            f"minutes of wall time ({min(cpu) / 60:.1f}–{max(cpu) / 60:.1f} of CPU time).")
    lines += goal(record["full_runs"])
    return Markdown("\n".join(lines))


def differences_from_full(settings: dict) -> set[str]:
    """The names of the settings in which a recorded run (its JSON ``settings``) differs from
    ``train.FULL`` as it is now."""
    from dataclasses import asdict

    from digitserve.train import FULL

    full = json.loads(json.dumps(asdict(FULL)))  # as saved: tuples become lists
    return {key for key in full.keys() | settings.keys() if settings.get(key) != full.get(key)}


def learning_rate(runs: list[dict]) -> list[str]:
    """The full runs that differ from ``train.FULL`` in the learning-rate peak only (seed 0)."""
    from digitserve.train import FULL

    ignored = {"max_lr", "seed", "threads", "test_every_epoch"}
    same = sorted({r["settings"]["max_lr"]: r for r in runs if r["seed"] == 0
                   and differences_from_full(r["settings"]) <= ignored}.values(),
                  key=lambda r: r["settings"]["max_lr"])
    if len(same) < 2:
        return []
    return ["- **the learning rate's peak** (`max_lr`; otherwise `train.FULL`, seed 0): "
            + ", ".join(f"{r['settings']['max_lr']:g} gave {100 * r['test_accuracy']:.2f} %"
                        for r in same)
            + f"; `train.FULL` uses {FULL.max_lr:g}."]


#: The lesson's goal for the full setting: this accuracy within this wall time.
GOAL_ACCURACY, GOAL_WALL_S = 0.994, 300


def meets_goal(run: dict) -> bool:
    """Whether a training run (``train.train``'s metrics or a recorded run) met the goal."""
    return run["test_accuracy"] >= GOAL_ACCURACY and run["wall_time_s"] <= GOAL_WALL_S


def goal(runs: list[dict]) -> list[str]:
    """Whether any measured run met the goal, and how close the runs came, from their figures."""
    met = [r for r in runs if meets_goal(r)]
    if met:
        best = max(met, key=lambda r: r["test_accuracy"])
        return [f"\n**The goal** ({GOAL_ACCURACY:.1%} within {GOAL_WALL_S / 60:.0f} minutes of "
                f"wall time) **was met** by {len(met)} of the {len(runs)} runs above; the most "
                f"accurate of them: {best['setting']}, {100 * best['test_accuracy']:.2f} % in "
                f"{best['wall_time_s'] / 60:.1f} minutes."]
    in_time = [r for r in runs if r["wall_time_s"] <= GOAL_WALL_S]
    line = (f"\n**The goal** ({GOAL_ACCURACY:.1%} within {GOAL_WALL_S / 60:.0f} minutes of "
            "wall time) **was not met** by any run above")
    if in_time:
        best = max(in_time, key=lambda r: r["test_accuracy"])
        line += (f": the best run within the time reached {100 * best['test_accuracy']:.2f} % "
                 f"({best['setting']})")
    top = max(runs, key=lambda r: (r["test_accuracy"], -r["wall_time_s"]))
    return [line + f"; the most accurate run, {100 * top['test_accuracy']:.2f} % "
            f"({top['setting']}), took {top['wall_time_s'] / 60:.1f} minutes at a load average of "
            f"{top['load_average'][0]:.0f}."]


if __name__ == "__main__":
    saved = load() if LEVERS_PATH.is_file() else {"full_runs": [], "other": []}
    saved.update(machine=machine(), step_costs=measure_step_costs(rounds=4, images=512),
                 measured_at=time.strftime("%Y-%m-%d %H:%M"))
    print(step_cost_table(saved).data)
    print(f"saved to {save(saved)}")
