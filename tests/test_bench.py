"""The benchmark: its analysis and tables on a frozen results file, its parsers on real byte
layouts, and one small run against a real TorchServe (files and fields; no timing asserted).

``tests/data/bench_results.json`` holds the measurements of a QUICK run (samples cut to 12 per
row) to which four lever servers were added by hand (copies of the batching-off server's gRPC
rows under other labels, throughputs scaled), so that every table and sentence has input.
"""

from __future__ import annotations

import copy
import io
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from digitserve import bench, preprocessing, synthetic
from digitserve.bench import analysis, figures, floor, levers, onwire, serverlogs, settings, tables

FROZEN = Path(__file__).parent / "data" / "bench_results.json"
ROW_KEYS = {"id", "situation", "measure", "unit", "grpc", "rest", "better", "ratio"}
LIVE_KEYS = {"strokes", "answers", "bytes_grpc", "bytes_rest", "ms_per_update_grpc",
             "ms_per_update_rest"}


@pytest.fixture()
def results() -> dict:
    """The frozen results, with what ``BenchRun.finish`` computes from them."""
    found = json.loads(FROZEN.read_text())
    found["why_grpc"] = analysis.why_grpc(found)
    found["breakdown"] = analysis.breakdown(found)
    found["findings"] = tables.findings(found)
    return found


# -- analysis ----------------------------------------------------------------------------------
@pytest.mark.unit
def test_verdict_is_a_tie_within_the_tolerance_and_knows_which_way_is_better() -> None:
    tolerance = settings.TIE_TOLERANCE
    assert analysis.verdict(10.0, 10.0 * (1 + tolerance * 0.9)) == {
        "better": "tie", "ratio": round(1 / (1 + tolerance * 0.9), 3)}
    assert analysis.verdict(5.0, 10.0) == {"better": "grpc", "ratio": 0.5}  # time: lower wins
    assert analysis.verdict(5.0, 10.0, higher_is_better=True)["better"] == "rest"
    assert analysis.verdict(300.0, 100.0, higher_is_better=True) == {"better": "grpc",
                                                                     "ratio": 3.0}
    assert analysis.verdict(1, 64)["better"] == "grpc"  # connections
    assert analysis.verdict(0, 3) == {"better": "grpc", "ratio": None}
    assert analysis.verdict(None, 3.0) == {"better": "tie", "ratio": None}


@pytest.mark.unit
def test_every_situation_is_compared_with_the_documented_fields(results: dict) -> None:
    rows = results["why_grpc"]["situations"]
    ids = {row["id"] for row in rows}
    assert ids == {"connection_reuse_plaintext", "connection_reuse_tls",
                   "new_connection_both_plaintext", "new_connection_both_tls", "rest_as_good",
                   "many_callers_64", "deadlines", "payload", "encoding"}
    for row in rows:
        assert set(row) == ROW_KEYS, row
        assert row["better"] in ("grpc", "rest", "tie")
        if row["ratio"] is not None:
            assert row["ratio"] == pytest.approx(row["grpc"] / row["rest"], abs=1e-3)
    # The figures come from the measurements, not from anywhere else.
    reuse = results["situations"]["connection_reuse"]["tls"]
    tls = next(r for r in rows if r["id"] == "connection_reuse_tls")
    assert (tls["grpc"], tls["rest"]) == (reuse["grpc_channel"]["p50_ms"],
                                          reuse["rest_new_connection"]["p50_ms"])
    many = [r for r in rows if r["id"] == "many_callers_64"]
    connections = next(r for r in many if r["measure"] == "connections open")
    assert (connections["grpc"], connections["better"]) == (1, "grpc")
    deadline = next(r for r in rows if r["measure"] == "abandoned calls the worker still ran")
    assert deadline["better"] == "tie"  # 8 and 8


@pytest.mark.unit
def test_decision_table_puts_each_comparison_in_one_column(results: dict) -> None:
    rows = results["why_grpc"]["situations"]
    decision = results["why_grpc"]["decision"]
    lines = decision["use_grpc_when"] + decision["rest_as_good_when"]
    figures_quoted = sum(line.count(" vs ") for line in lines)
    assert figures_quoted == len(rows)
    for row in rows:
        column = "use_grpc_when" if row["better"] == "grpc" else "rest_as_good_when"
        assert any(f"{row['measure']} {analysis._num(row['grpc'])} vs "
                   f"{analysis._num(row['rest'])}" in line for line in decision[column]), row
    table = tables.decision_table(results)
    assert table.splitlines()[0].startswith("| use gRPC when…")
    assert len(table.splitlines()) == 2 + max(len(decision["use_grpc_when"]),
                                              len(decision["rest_as_good_when"]))


@pytest.mark.unit
def test_takeaways_quote_this_runs_figures(results: dict) -> None:
    rows = results["why_grpc"]["situations"]
    takeaways = results["why_grpc"]["takeaways"]
    assert 3 <= len(takeaways) <= 5
    counts = {k: sum(r["better"] == k for r in rows) for k in ("grpc", "rest", "tie")}
    assert takeaways[0] == (f"Of {len(rows)} comparisons in this run, gRPC did better in "
                            f"{counts['grpc']}, REST in {counts['rest']}, and {counts['tie']} "
                            "were ties (within 10% of each other).")
    deadline = results["situations"]["deadlines"]
    assert any(f"worker still ran {deadline['grpc']['worker_ran']} and "
               f"{deadline['rest']['worker_ran']} of them" in line for line in takeaways)
    assert not any("issue" in line for line in takeaways)


@pytest.mark.unit
def test_time_breakdown_adds_up_to_the_call_from_its_sources(results: dict) -> None:
    parts = results["breakdown"]
    reuse = results["situations"]["connection_reuse"]["plaintext"]
    for mode, key in (("grpc", "grpc_channel"), ("rest", "rest_keep_alive")):
        entry = parts[mode]
        assert [p["part"] for p in entry["parts"]] == list(analysis.PARTS)
        assert all(p["ms"] >= 0 for p in entry["parts"])
        assert entry["total_ms"] == reuse[key]["trimmed_mean_ms"]
        # The two halves of the handler come from the floor, scaled to fit the handler's time.
        scale = entry["floor_scaled"]
        assert 0 < scale <= 1
        assert entry["parts"][-1]["ms"] == pytest.approx(
            results["floor"]["forward_p50_ms"] * scale, abs=1e-3)
        assert entry["parts"][-2]["ms"] == pytest.approx(
            results["floor"]["preprocess_p50_ms"] * scale, abs=1e-3)
        log = reuse[key]["server_log"]
        assert sum(p["ms"] for p in entry["parts"][-3:]) == pytest.approx(
            max(log["handler_ms"], 0), abs=2e-3)
        assert entry["parts"][0]["ms"] == pytest.approx(
            max(entry["total_ms"] - log["in_frontend_ms"], 0), abs=1e-3)
    assert "One gRPC call" in tables.breakdown_sentence(results)


# -- tables and files --------------------------------------------------------------------------
@pytest.mark.unit
def test_tables_hold_one_line_per_measurement(results: dict) -> None:
    main = tables.main_table(results)
    assert len(main.splitlines()) == 2 + len([r for r in results["rows"]
                                              if r["kind"] in ("floor", "main")])
    assert len(tables.reuse_table(results, "plaintext").splitlines()) == 2 + 4
    assert len(tables.many_callers_table(results).splitlines()) == 2 + 2
    assert len(tables.deadline_table(results).splitlines()) == 2 + 2
    situations = tables.situations_table(results)
    assert len(situations.splitlines()) == 2 + len(results["why_grpc"]["situations"])
    levers_table = tables.levers_table(results)
    assert "OMP_WAIT_POLICY=PASSIVE" in levers_table and "quiet.xml" in levers_table
    assert tables.situation_errors(results) == 0 and tables.situation_mismatches(results) == 0


@pytest.mark.unit
def test_findings_say_which_lever_won_from_the_numbers(results: dict) -> None:
    text = "\n".join(results["findings"])
    assert "fastest first: 2 workers × 1 torch thread" in text  # scaled ×1.3 in the data
    assert "OMP_WAIT_POLICY=PASSIVE" in text and ": less." in text  # scaled ×0.5 against ×0.8
    assert "Load average" in text


@pytest.mark.unit
def test_write_results_writes_every_file(results: dict, tmp_path: Path) -> None:
    results = copy.deepcopy(results)
    results["live_drawing"] = {key: 1 for key in LIVE_KEYS}
    # The shape digitserve.worst_case.measure documents, served figures left out.
    results["worst_case"] = {
        "limit_pixels": 4194304, "max_request_bytes": 4194304, "repeats": 1,
        "cases": [{"case": "png_rgba", "description": "RGBA PNG 2048×2048",
                   "grpc_request_bytes": 123456, "in_process_answer": "digit 1",
                   "in_process_ms": 812.0, "in_process_peak_rise_mb": 96.5,
                   "served_answer": None, "served_ms": None, "worker_peak_rise_mb": None,
                   "worker_rss_mb": None, "same_worker": None}],
        "worst": {"in_process_ms": 812.0, "in_process_peak_rise_mb": 96.5, "served_ms": None,
                  "worker_peak_rise_mb": None, "worker_rss_mb": None, "cases": {}}}
    results["why_grpc"] = analysis.why_grpc(results)
    files = tables.write_results(results, tmp_path)
    assert set(files) >= {"why_grpc", "json", "csv", "markdown"} | {
        f"{name}_png" for name in figures.FIGURES}
    for name, path in files.items():
        assert Path(path).is_file() and Path(path).stat().st_size > 0, name
        if name.endswith("png"):
            with Image.open(path) as image:
                assert image.format == "PNG" and min(image.size) > 100
    why = json.loads(Path(files["why_grpc"]).read_text())
    assert set(why) >= {"situations", "live_drawing"}
    assert set(why["live_drawing"]) == LIVE_KEYS
    assert all(set(row) == ROW_KEYS for row in why["situations"])
    readme = tables.readme_section(results)
    assert results["why_grpc"]["takeaways"][0] in readme and "| use gRPC when" in readme
    report = Path(files["markdown"]).read_text()
    assert "| png_rgba | RGBA PNG 2048×2048 | 123,456 | digit 1 | 812 | 96 |" in report
    for heading in ("## Takeaways", "## Use gRPC when", "## Every comparison", "## Deadlines",
                    "## Many callers", "## Levers", "## Live drawing", "## The worst-case"):
        assert heading in report
    assert "issue" not in report


# -- parsers -----------------------------------------------------------------------------------
def _frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return (len(payload).to_bytes(3, "big") + bytes([kind, flags])
            + stream.to_bytes(4, "big") + payload)


@pytest.mark.unit
def test_http2_frames_are_split_and_their_headers_decoded() -> None:
    from hpack import Encoder

    encoder = Encoder()
    headers = [(":path", "/org.pytorch.serve.grpc.inference.InferenceAPIsService/Predictions"),
               ("content-type", "application/grpc"), ("grpc-timeout", "10S"),
               ("authorization", "Bearer secret12")]
    block = encoder.encode(headers)
    message = b"\x0a\x03abc"
    stream = (onwire.PREFACE + _frame(4, 0, 0, b"") + _frame(1, 4, 1, block)
              + _frame(0, 1, 1, b"\x00" + len(message).to_bytes(4, "big") + message)
              + _frame(1, 4, 3, encoder.encode(headers)))
    frames = onwire.http2_frames(stream)
    assert [f["type"] for f in frames] == ["SETTINGS", "HEADERS", "DATA", "HEADERS"]
    assert frames[1]["bytes"] == 9 + len(block)
    shown = dict(frames[1]["headers"])
    assert shown["grpc-timeout"] == "10S" and shown["content-type"] == "application/grpc"
    assert shown["authorization"] == "Bearer <8 characters>"  # the token never shows
    assert frames[2]["message_bytes"] == len(message)
    assert frames[3]["bytes"] < frames[1]["bytes"]  # HPACK: the second time, table indexes
    assert dict(frames[3]["headers"]) == shown


@pytest.mark.unit
def test_http1_messages_are_split_into_head_and_body() -> None:
    body = b"\x89PNG" + bytes(20)
    request = (b"POST /predictions/digitmodel HTTP/1.1\r\nHost: 127.0.0.1\r\n"
               b"Authorization: Bearer secret12\r\nContent-Length: 24\r\n\r\n" + body)
    first, second = onwire.http1_messages(request + request)
    assert first["first_line"] == "POST /predictions/digitmodel HTTP/1.1"
    assert first["body_bytes"] == 24 and first["bytes"] == len(request)
    assert "Authorization: Bearer <8 characters>" in first["headers"]
    assert second == first


@pytest.mark.unit
def test_server_log_lines_become_timings_and_answer_counts(tmp_path: Path) -> None:
    (tmp_path / "logs").mkdir()
    window = serverlogs.LogWindow(tmp_path)  # before the lines: they all count
    ts_log = "\n".join([
        "2026 [DEBUG] W-9000 org.pytorch.serve.job.GRPCJob - Waiting time ns: 1000000, "
        "Backend time ns: 4000000",
        "2026 [DEBUG] W-9000 org.pytorch.serve.job.GRPCJob - Waiting time ns: 1000000, "
        "Backend time ns: 4000000",  # TorchServe writes it twice: counted once
        "2026 [INFO ] W-9000 org.pytorch.serve.wlm.WorkerThread - Backend response time: 3",
        "2026 [INFO ] W-9000 org.pytorch.serve.wlm.BatchAggregator - Sending response for "
        "jobId 845cb22f-a615-4210-ad1d-7bcad86300f6",
        "2026 [WARN ] W-9000 org.pytorch.serve.job.GRPCJob - grpc client call already "
        "cancelled, not able to send this response for requestId: "
        "845cb22f-a615-4210-ad1d-7bcad86300f6",
    ]) + "\n"
    (tmp_path / serverlogs.TS_LOG).write_text(ts_log)
    (tmp_path / serverlogs.MODEL_METRICS).write_text(
        "2026 - PredictionTime.ms:2.5|#ModelName:digitmodel,Level:Model|#hostname:vm\n")
    assert serverlogs.timings(window) == {"requests_logged": 1, "queue_ms": 1.0,
                                          "in_frontend_ms": 5.0, "worker_round_trip_ms": 3.0,
                                          "handler_ms": 2.5}
    assert serverlogs.worker_answers(window) == {"answered": 1, "answered_after_cancel": 1}
    later = serverlogs.LogWindow(tmp_path)
    assert serverlogs.worker_answers(later) == {"answered": 0, "answered_after_cancel": 0}


# -- settings and inputs -----------------------------------------------------------------------
@pytest.mark.unit
def test_server_configs_become_server_settings(tmp_path: Path) -> None:
    for name in ("quiet", "lean"):
        assert settings.log4j2_file(name).is_file()  # shipped as package data
    quiet = settings.server_settings(bench.ServerConfig("q", logging="lean", environment=(
        ("OMP_WAIT_POLICY", "PASSIVE"),)), tmp_path, tmp_path)
    assert quiet.log4j2_config == settings.log4j2_file("lean")
    assert quiet.extra_properties["metrics_mode"] == "prometheus"
    assert dict(quiet.environment) == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert quiet.extra_properties["job_queue_size"] == str(settings.JOB_QUEUE_SIZE)
    certificate = settings.rsa_certificate(tmp_path / "tls")
    tls = settings.server_settings(settings.TLS_SERVER, tmp_path, tmp_path, certificate)
    assert tls.tls == certificate
    assert tls.extra_properties["inference_address"].startswith("https://127.0.0.1:")
    assert b"BEGIN PRIVATE KEY" in certificate.key.read_bytes()
    with pytest.raises(ValueError, match="logging is one of"):
        settings.server_settings(bench.ServerConfig("x", logging="loud"), tmp_path, tmp_path)
    labels = [server.label for server in levers.lever_servers()]
    extended = [server.label for server in levers.lever_servers(extended=True)]
    assert len(labels) == len(set(labels)) and not any("PASSIVE" in label for label in labels)
    assert set(labels) < set(extended) and any("PASSIVE" in label for label in extended)


@pytest.mark.unit
def test_padded_png_grows_the_bytes_not_the_image() -> None:
    """The payload sweep's padding changes the size on the wire and nothing the model sees."""
    digit = np.zeros((28, 28), dtype=np.uint8)
    digit[6:22, 12:16] = 255
    png = synthetic.png(digit)
    padded = floor.padded_png(png, 50_000)
    assert len(padded) == 50_000
    assert (preprocessing.digit_from_payload(padded)
            == preprocessing.digit_from_payload(png)).all()
    Image.open(io.BytesIO(padded)).verify()  # still a valid PNG, CRCs included
    assert floor.padded_png(png, 10) == png


# -- one small run against a real TorchServe ---------------------------------------------------
@pytest.mark.integration
def test_smallest_run_measures_every_situation(model_store: Path, tmp_path: Path,
                                               server_group_recorder) -> None:
    smallest = replace(bench.QUICK_BENCH, requests=6, warmup=1, server_warmup=4,
                       concurrencies=(1, 2), images=8, floor_requests=8, reuse_requests=4,
                       in_flight=(8,), load_requests=16, payload_sizes=(10_000,),
                       payload_requests=3, encoding_requests=3, lever_iterations=3,
                       out_dir=tmp_path / "bench")
    results = bench.run_benchmark(
        smallest, model_store=model_store, run_root=tmp_path / "runs",
        on_start=lambda server: server_group_recorder(server.process.pid))
    why = json.loads(Path(results["files"]["why_grpc"]).read_text())
    ids = {row["id"] for row in why["situations"]}
    assert ids >= {"connection_reuse_plaintext", "connection_reuse_tls", "rest_as_good",
                   "many_callers_8", "deadlines", "payload", "encoding"}
    assert all(set(row) == ROW_KEYS for row in why["situations"])
    assert tables.situation_errors(results) == 0 and tables.situation_mismatches(results) == 0
    for row in results["rows"]:
        assert row["errors"] == 0 and row["mismatches"] == 0, row
    deadline = results["situations"]["deadlines"]
    assert deadline["grpc"]["outcomes"] == ["DEADLINE_EXCEEDED"]
    assert deadline["rest"]["outcomes"] == ["client timeout"]
    assert deadline["grpc"]["worker_ran"] >= 1  # TorchServe runs abandoned work
    wire = results["situations"]["on_the_wire"]
    request_types = [f["type"] for f in wire["grpc"][0]["request"]]
    assert "HEADERS" in request_types and "DATA" in request_types
    assert dict(wire["grpc"][0]["request"][0]["headers"])["content-type"] == "application/grpc"
    assert wire["rest"][0]["request"]["first_line"].startswith("POST /predictions/")
    assert set(results["breakdown"]) >= {"grpc", "rest"}
    for name, path in results["files"].items():
        assert Path(path).is_file(), name
    assert not list((tmp_path / "runs").glob("*/server.json"))  # every server stopped
