"""The benchmark at its smallest setting, against a real TorchServe: files and fields, no timings.

Timings on a shared CI machine mean nothing, so nothing here asserts a speed: only that every
path was measured, every answer was right, and every result file holds what the notebook reads.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import pytest
from PIL import Image

from digitserve import bench, preprocessing, synthetic


@pytest.mark.unit
def test_padded_png_grows_the_bytes_not_the_image(mnist_test) -> None:
    """The payload sweep's padding changes the size on the wire and nothing the model sees."""
    png = synthetic.png(mnist_test[0][0].numpy())
    padded = bench.padded_png(png, 50_000)
    assert len(padded) == 50_000
    assert (preprocessing.digit_from_payload(padded)
            == preprocessing.digit_from_payload(png)).all()
    Image.open(io.BytesIO(padded)).verify()  # still a valid PNG, CRCs included
    assert bench.padded_png(png, 10) == png


@pytest.mark.integration
def test_smallest_benchmark_writes_every_result(model_store: Path, tmp_path: Path,
                                                server_group_recorder) -> None:
    settings = bench.smallest()
    results = bench.run_benchmark(
        settings, model_store=model_store, out_dir=tmp_path / "bench",
        run_root=tmp_path / "runs", progress=False,
        on_start=lambda server: server_group_recorder(server.process.pid),
    )

    files = {name: Path(path) for name, path in results["files"].items()}
    assert set(files) == {"json", "csv", "markdown", "latency_png", "throughput_png",
                          "payload_png"}
    for name, path in files.items():
        assert path.is_file() and path.stat().st_size > 0, name
        if name.endswith("png"):
            with Image.open(path) as image:
                assert image.format == "PNG" and min(image.size) > 100

    written = json.loads(files["json"].read_text())
    assert written["settings"]["requests"] == settings.requests
    assert {"cpus", "torch", "torchserve", "load_average_start"} <= set(written["environment"])

    # The floor, then every mode at every concurrency on every server.
    floor = written["floor"]
    assert floor["batch1_p50_ms"] > 0 and floor["batch_throughput_rps"] > 0
    assert floor["preprocess_p50_ms"] > 0 and floor["forward_p50_ms"] > 0
    threads = {str(t) for t in {1, os.cpu_count() or 1}}
    assert set(floor["by_threads"]) == threads  # JSON keys are strings
    floor_rows = [row for row in written["rows"] if row["mode"] == "in-process"]
    assert {(str(r["torch_threads"]), r["images_per_call"]) for r in floor_rows} == {
        (t, b) for t in threads for b in (1, settings.batch_size)}
    assert floor["batch1_p50_ms"] == min(r["p50_ms"] for r in floor_rows
                                         if r["images_per_call"] == 1)
    measured = {(row["config"], row["mode"], row["concurrency"]) for row in written["rows"]}
    for server in settings.servers():
        for mode in bench.MODES:
            for concurrency in settings.concurrencies:
                assert (server.label, mode, concurrency) in measured
    for row in written["rows"]:
        assert row["errors"] == 0 and row["mismatches"] == 0, row
        assert row["requests"] >= 1
        assert 0 < row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"], row
        assert row["throughput_rps"] > 0
        assert row["p50_vs_floor"] > 0 and row["throughput_vs_floor"] > 0
        assert len(written["samples"][row["id"]]) == row["requests"] // row["images_per_call"]
        if row["mode"] == bench.STREAM:
            assert 0 < row["first_p50_ms"] <= row["p99_ms"]
        if row["kind"] == "main":
            assert row["server_cpu_ms"] > 0 and row["client_cpu_ms"] >= 0

    (server,) = written["servers"]
    assert 0 < server["ready_s"] <= server["first_prediction_s"]
    assert server["log_bytes_per_request"] > 0
    sizes = {(row["mode"], row["payload_bytes"]) for row in written["payload"]}
    assert len(sizes) == 2 * (1 + len(settings.payload_sizes))
    assert all(row["errors"] == 0 and row["mismatches"] == 0 for row in written["payload"])
    levers = {row["lever"] for row in written["levers"]}
    assert {"autograd", "memory format", "graph", "torch threads"} <= levers

    assert [t["goal"] for t in written["targets"]] == ["≤ 1.25", "≥ 0.7", "all", "≤ 8"]
    assert all(isinstance(t["met"], bool) for t in written["targets"])
    assert written["findings"] and all(isinstance(line, str) for line in written["findings"])

    with open(files["csv"], newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(written["rows"])
    assert set(bench.ROW_FIELDS) == set(rows[0])

    table = bench.markdown_table(written)
    assert table.startswith("| server | mode | callers | p50 ms")
    assert len(table.splitlines()) == 2 + len(written["rows"])
    report = files["markdown"].read_text()
    for heading in ("## Findings", "## Targets", "## Measurements", "## Cold start",
                    "## Payload size", "## Levers"):
        assert heading in report
    # The servers were stopped: nothing of theirs is left (conftest also checks at the end).
    assert not list((tmp_path / "runs").glob("*/server.json"))
