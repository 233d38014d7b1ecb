"""The results as markdown tables and sentences, and the files a run writes.

Every sentence here is computed from the results (nothing is written in advance); every table
is plain markdown, so a notebook shows it with ``IPython.display.Markdown`` and ``results.md``
holds them all.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from digitserve.bench import analysis, figures

WHY_GRPC_JSON = "why_grpc.json"
RESULTS_JSON = "results.json"
RESULTS_CSV = "results.csv"
RESULTS_MD = "results.md"
ROW_FIELDS = ("id", "kind", "config", "mode", "concurrency", "images_per_call", "workers",
              "torch_threads", "batch_size", "max_batch_delay_ms", "logging", "requests",
              "errors", "mismatches", "p50_ms", "p90_ms", "p99_ms", "mean_ms", "throughput_rps",
              "client_cpu_ms", "server_cpu_ms", "p50_vs_floor", "throughput_vs_floor",
              "first_error")


def markdown(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def cell(value: object) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(value: float | None, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:,.{digits}f}"


def rows_of(results: dict, kind: str, **match: object) -> list[dict]:
    return [row for row in results["rows"] if row["kind"] == kind
            and all(row.get(key) == value for key, value in match.items())]


# -- stage tables --------------------------------------------------------------------------------
def floor_table(results: dict) -> str:
    f = results["floor"]
    lines = [[f"{t} torch thread{'s' if int(t) > 1 else ''}", fmt(v["batch1_p50_ms"]),
              fmt(v["batch_throughput_rps"], 0)] for t, v in f["by_threads"].items()]
    return (markdown(["in this process", "one image, p50 ms",
                      f"images/s in batches of {f['batch_size']}"], lines)
            + f"\n\nOne image: reading it {fmt(f['preprocess_p50_ms'])} ms + the model "
            f"{fmt(f['forward_p50_ms'])} ms (p50, {f['torch_threads']} torch thread"
            f"{'s' if f['torch_threads'] > 1 else ''}).")


def main_table(results: dict, kind: str = "main") -> str:
    """Every main measurement beside the floor; CPU columns are milliseconds per image."""
    header = ["server", "protocol", "callers", "p50 ms", "p99 ms", "images/s", "p50 ÷ floor",
              "images/s ÷ floor", "client CPU ms", "server CPU ms", "errors"]
    lines = [[r["config"], r["mode"] if r["mode"] != "in-process"
              else f"in-process, batch {r['batch_size']}", r["concurrency"], fmt(r["p50_ms"]),
              fmt(r["p99_ms"]), fmt(r["throughput_rps"], 0), fmt(r["p50_vs_floor"]),
              fmt(r["throughput_vs_floor"]), fmt(r["client_cpu_ms"]), fmt(r["server_cpu_ms"]),
              r["errors"] + r["mismatches"]]
             for r in results["rows"] if r["kind"] in ("floor", kind)]
    return markdown(header, lines)


REUSE_NAMES = {"grpc_channel": ("gRPC", "one channel for every call"),
               "grpc_new_channel": ("gRPC", "a new channel per call"),
               "rest_keep_alive": ("REST", "one connection kept alive"),
               "rest_new_connection": ("REST", "a new connection per call")}


def reuse_table(results: dict, key: str) -> str:
    found = results["situations"]["connection_reuse"][key]
    wire = found.get("wire") or {}
    lines = []
    for name, (protocol, how) in REUSE_NAMES.items():
        r = found[name]
        on_wire = (wire.get(name) or {}).get("bytes_per_call")
        lines.append([protocol, how, fmt(r["p50_ms"]), fmt(r["p99_ms"]), fmt(r["client_cpu_ms"]),
                      fmt(r["server_cpu_ms"]), fmt(on_wire, 0), r["errors"] + r["mismatches"]])
    return markdown(["protocol", "connection", "p50 ms", "p99 ms", "client CPU ms",
                     "server CPU ms", "bytes on the wire per call", "errors"], lines)


def payload_table(results: dict) -> str:
    found = results["situations"]
    lines = [[_bytes(r["payload_bytes"]), r["mode"], fmt(r["p50_ms"]), fmt(r["p99_ms"])]
             for r in found.get("payload", [])]
    text = markdown(["PNG on the wire", "protocol", "p50 ms", "p99 ms"], lines)
    encoding = found.get("encoding")
    if encoding:
        wire = encoding.get("wire") or {}
        text += "\n\n" + markdown(
            ["protocol", "784 pixels sent as", "request body bytes", "bytes on the wire per call",
             "p50 ms", "errors"],
            [[mode, encoding[mode]["what"], encoding[mode]["body_bytes"],
              fmt((wire.get(mode) or {}).get("bytes_per_call"), 0), fmt(encoding[mode]["p50_ms"]),
              encoding[mode]["errors"] + encoding[mode]["mismatches"]]
             for mode in ("grpc", "rest")])
    return text


def many_callers_table(results: dict) -> str:
    lines = []
    for level in results["situations"].get("many_callers", []):
        for mode, client in (("grpc", "grpc.aio, one channel"), ("rest", "aiohttp pool")):
            r = level[mode]
            lines.append([level["in_flight"], f"{mode} ({client})", fmt(r["throughput_rps"], 0),
                          fmt(r["p50_ms"]), fmt(r["p99_ms"]), r["connections"],
                          fmt(r["client_cpu_ms"]), fmt(r["server_cpu_ms"]),
                          r["errors"] + r["mismatches"]])
    return markdown(["calls in flight", "protocol", "images/s", "p50 ms", "p99 ms",
                     "connections open", "client CPU ms/call", "server CPU ms/call", "errors"],
                    lines)


def deadline_table(results: dict) -> str:
    d = results["situations"]["deadlines"]
    lines = [[mode, ", ".join(d[mode]["outcomes"]), f"{d[mode]['expired']} of {d['calls']}",
              fmt(d[mode]["ms_to_error_p50"], 0), f"{d[mode]['worker_ran']} of {d['calls']}",
              d[mode]["answered_after_cancel"] if mode == "grpc" else "not logged"]
             for mode in ("grpc", "rest")]
    return markdown(["protocol", "what the caller got", "gave up", "after (ms, p50)",
                     "the worker still ran", "answers dropped by the frontend"], lines)


def worst_case_table(results: dict) -> str:
    """One line per costliest request, then the worst of each figure."""
    found = results.get("worst_case")
    if not found:
        return "(not measured)"
    lines = [[row["case"], row["description"], f"{row['grpc_request_bytes']:,}",
              row["in_process_answer"], fmt(row["in_process_ms"], 0),
              fmt(row["in_process_peak_rise_mb"], 0), row["served_answer"] or "–",
              fmt(row["served_ms"], 0), fmt(row["worker_peak_rise_mb"], 0)]
             for row in found["cases"]]
    worst = found["worst"]
    # The in-process run times an untrained DigitCNN (the cost is the same): its digit means
    # nothing, so the header says so; the served answer comes from the archive's weights.
    return (markdown(["case", "request", "bytes", "answer in-process (untrained weights)", "ms",
                      "peak rise MiB", "answer served (the archive's weights)", "served ms",
                      "worker peak rise MiB"], lines)
            + f"\n\nWorst: {fmt(worst['in_process_ms'], 0)} ms and "
            f"{fmt(worst['in_process_peak_rise_mb'], 0)} MiB in-process; "
            f"{fmt(worst['served_ms'], 0)} ms and {fmt(worst['worker_peak_rise_mb'], 0)} MiB "
            f"through TorchServe (a worker of {fmt(worst['worker_rss_mb'], 0)} MiB at most); "
            f"{found['repeats']} call(s) per case.")


def levers_table(results: dict) -> str:
    lines = []
    batch = results["floor"]["batch_size"]
    for r in results["levers"]:
        note = r.get("note", "")
        if r.get("setup_s") is not None and r["lever"] == "graph":
            note = f"setup {r['setup_s']:.1f} s per worker start {note}".strip()
        lines.append([r["lever"], r["variant"], fmt(r.get("p50_ms")),
                      f"{r['throughput_rps']:.0f} images/s (batch {batch})"
                      if "throughput_rps" in r else "", fmt(r.get("cpu_ms")), note])
    for label, entry in lever_servers(results).items():
        one, many = entry["rows"].get(1), entry["rows"].get(entry["most"])
        lines.append(["server", label, fmt(one["p50_ms"]) if one else "",
                      f"{many['throughput_rps']:.0f} images/s ({entry['most']} callers)"
                      if many else "", fmt(many.get("server_cpu_ms")) if many else "",
                      f"{fmt(entry['server'].get('log_bytes_per_request'), 0)} log bytes/request"])
    return markdown(["lever", "variant", "p50 ms (1 image, 1 caller)", "throughput",
                     "CPU ms / image", "note"], lines)


def lever_servers(results: dict) -> dict[str, dict]:
    """The lever servers (and the main batching-off server they are compared with)."""
    out = {}
    kinds = {"lever"} | ({"main"} if any(s["kind"] == "lever" for s in results["servers"])
                         else set())
    for server in results["servers"]:
        if server["kind"] not in kinds or server["label"] in out:
            continue
        rows = {r["concurrency"]: r for r in results["rows"] if r["kind"] == server["kind"]
                and r["config"] == server["label"] and r["mode"] == "grpc"}
        if server["kind"] == "main" and server["batch_size"] > 1:
            continue
        if rows:
            label = server["label"] if server["kind"] == "lever" else \
                f"1 worker × 1 torch thread (the kit's default; {server['label']})"
            out[label] = {"server": server, "rows": rows, "most": max(rows)}
    return out


def cold_start_table(results: dict) -> str:
    lines = [[s["label"], s["kind"], fmt(s.get("ready_s")), fmt(s.get("first_request_ms"), 1),
              fmt(s.get("first_prediction_s")), fmt(s.get("log_bytes_per_request"), 0)]
             for s in results["servers"]]
    return markdown(["server", "used for", "start() returned (s)", "then the first call (ms)",
                     "cold start: first prediction (s)", "log bytes / request"], lines)


def situations_table(results: dict) -> str:
    rows = results["why_grpc"]["situations"]
    return markdown(["situation", "measure", "gRPC", "REST", "unit", "better", "gRPC ÷ REST"],
                    [[r["situation"], r["measure"], analysis._num(r["grpc"]),
                      analysis._num(r["rest"]), r["unit"], r["better"], fmt(r["ratio"])]
                     for r in rows])


def decision_table(results: dict) -> str:
    decision = results["why_grpc"]["decision"]
    grpc, rest = decision["use_grpc_when"], decision["rest_as_good_when"]
    lines = [[grpc[i] if i < len(grpc) else "", rest[i] if i < len(rest) else ""]
             for i in range(max(len(grpc), len(rest)))]
    return markdown(["use gRPC when… (gRPC vs REST)", "REST is as good when… (gRPC vs REST)"],
                    lines)


def situation_measurements(results: dict) -> list[dict]:
    """Every timed measurement of the situations (the deadline calls, meant to fail, aside)."""
    found = results["situations"]
    out = [found["connection_reuse"][key][name] for key in found.get("connection_reuse", {})
           for name in REUSE_NAMES]
    out += [level[mode] for level in found.get("many_callers", []) for mode in ("grpc", "rest")]
    out += list(found.get("payload", []))
    out += [found["encoding"][mode] for mode in ("grpc", "rest") if "encoding" in found]
    return out


def situation_errors(results: dict) -> int:
    return sum(m["errors"] for m in situation_measurements(results))


def situation_mismatches(results: dict) -> int:
    return sum(m["mismatches"] for m in situation_measurements(results))


# -- sentences -----------------------------------------------------------------------------------
def breakdown_sentence(results: dict) -> str:
    """The time breakdown in words, one sentence per protocol."""
    parts = analysis.breakdown(results)
    lines = []
    for mode, name in (("grpc", "gRPC"), ("rest", "REST")):
        if mode in parts:
            added, share = analysis.served_overhead(parts[mode])
            lines.append(f"- One {name} call: {parts[mode]['total_ms']:.2f} ms; "
                         + ", ".join(f"{p['part']} {p['ms']:.2f}" for p in parts[mode]["parts"])
                         + f" ms. TorchServe's frontend, queue and worker socket: "
                         f"{added:.2f} ms ({share:.0%} of the call).")
    return "\n".join(lines) or "(TorchServe's log lines for the breakdown were not found.)"


def findings(results: dict) -> list[str]:
    """Sentences about the floor, the servers, cold start and the levers of this run."""
    out, f = [], results["floor"]
    out.append(f"In this process, one image takes {f['batch1_p50_ms']:.2f} ms (p50): reading "
               f"it {f['preprocess_p50_ms']:.2f} ms, the model {f['forward_p50_ms']:.2f} ms; in "
               f"batches of {f['batch_size']}, {f['batch_throughput_rps']:.0f} images/s.")
    single = sorted(rows_of(results, "main", mode="grpc", concurrency=1),
                    key=lambda r: r["p50_ms"])
    if single:
        best = single[0]
        out.append(f"Served over gRPC, one caller: {best['p50_ms']:.2f} ms p50 at best "
                   f"({best['config']}), {best['p50_ms'] - f['batch1_p50_ms']:+.2f} ms against "
                   f"the floor (×{best['p50_vs_floor']:.2f}).")
    starts = [s for s in results["servers"] if "first_prediction_s" in s]
    if starts:
        first = [s["first_prediction_s"] for s in starts]
        out.append(f"Cold start, from start() to the first prediction: "
                   f"{min(first):.1f}–{max(first):.1f} s over {len(starts)} starts.")
    most = max((r["concurrency"] for r in rows_of(results, "main")), default=1)
    for mode in ("grpc", "rest"):
        rows = {r["config"]: r for r in rows_of(results, "main", mode=mode, concurrency=most)}
        if len(rows) > 1:
            out.append(f"{mode} at {most} callers: " + "; ".join(
                f"{label} {r['throughput_rps']:.0f} images/s" for label, r in rows.items()) + ".")
    out += _lever_findings(results)
    load = results["environment"].get("load_average_start"), \
        results["environment"].get("load_average_end")
    out.append(f"Load average (1, 5, 15 min) at the start {load[0]} and end {load[1]} on "
               f"{results['environment']['cpus']} CPUs: on a busy machine, figures are noise.")
    return out


def _lever_findings(results: dict) -> list[str]:
    servers = lever_servers(results)
    if not servers:
        return []
    out = []
    threads = {label: e for label, e in servers.items()
               if e["server"]["logging"] == "default" and not e["server"]["environment"]}
    if threads:
        ranked = sorted(threads.items(), key=lambda item: -item[1]["rows"][item[1]["most"]]
                        ["throughput_rps"])
        most = ranked[0][1]["most"]
        out.append(f"Workers × torch threads (batching off, gRPC, {most} callers), fastest "
                   "first: " + "; ".join(f"{label} {e['rows'][most]['throughput_rps']:.0f} "
                                         "images/s" for label, e in ranked) + ".")
        lone = min(threads.items(), key=lambda item: item[1]["rows"][1]["p50_ms"])
        out.append(f"For a lone caller the lowest p50 was {lone[0]} "
                   f"({lone[1]['rows'][1]['p50_ms']:.2f} ms).")
    passive = next((e for e in servers.values() if e["server"]["environment"]), None)
    same = next((e for e in threads.values() if passive
                 and e["server"]["torch_threads"] == passive["server"]["torch_threads"]
                 and e["server"]["workers"] == passive["server"]["workers"]), None)
    if passive and same:
        with_, without = (e["rows"][e["most"]]["throughput_rps"] for e in (passive, same))
        word = "more" if with_ > without * 1.1 else "less" if with_ < without * 0.9 else \
            "about as much"
        out.append(f"OMP_WAIT_POLICY=PASSIVE ({passive['server']['label']}) served {with_:.0f} "
                   f"images/s against {without:.0f} without it: {word}.")
    logs = {label: e for label, e in servers.items() if e["server"]["logging"] != "default"}
    base = next((e for e in threads.values() if e["server"]["workers"] == 1
                 and e["server"]["torch_threads"] == 1), None)
    for label, e in logs.items():
        if base:
            out.append(f"{label}: {e['server'].get('log_bytes_per_request') or 0:.0f} log bytes "
                       f"per request against {base['server'].get('log_bytes_per_request') or 0:.0f}"
                       f" with TorchServe's own; p50 alone {e['rows'][1]['p50_ms']:.2f} ms "
                       f"against {base['rows'][1]['p50_ms']:.2f} ms.")
    return out


def _bytes(size: float) -> str:
    for unit, scale in (("MB", 1e6), ("KB", 1e3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size:.0f} B"


# -- files ---------------------------------------------------------------------------------------
def report(results: dict) -> str:
    """Every table and sentence of a run, as one markdown document."""
    env = results["environment"]
    quick = " (QUICK setting: small counts, not for reporting)" if results["settings"]["quick"] \
        else ""
    parts = [
        "# When does gRPC pay off? DigitCNN on TorchServe, gRPC and REST side by side",
        f"{env['cpus']} CPUs, {env['processor']}, {env['platform']}; torch {env['torch']}, "
        f"TorchServe {env['torchserve']}, grpcio {env['grpcio']}; started {env['started_at']}"
        f"{quick}.",
        "## Takeaways", "\n".join(f"- {line}" for line in results["why_grpc"]["takeaways"]),
        "## Use gRPC when… / REST is as good when…", decision_table(results),
        f"## Every comparison (a tie: within {analysis.TIE_TOLERANCE:.0%})",
        situations_table(results),
        "## Findings", "\n".join(f"- {line}" for line in results["findings"]),
        "## The floor", floor_table(results),
        "## Main servers", main_table(results),
    ]
    found = results["situations"]
    for key in ("plaintext", "tls"):
        if key in found.get("connection_reuse", {}):
            parts += [f"## Connection reuse ({key})", reuse_table(results, key)]
    if found.get("many_callers"):
        parts += ["## Many callers", many_callers_table(results)]
    if found.get("deadlines"):
        parts += ["## Deadlines", deadline_table(results)]
    if found.get("payload") or found.get("encoding"):
        parts += ["## Payload and encoding", payload_table(results)]
    if results.get("live_drawing"):
        parts += ["## Live drawing", markdown(["figure", "value"], [
            [key, value] for key, value in results["live_drawing"].items() if key != "answers"])]
    if results.get("worst_case"):
        parts += ["## The worst-case request (at the kit's input limits)",
                  worst_case_table(results)]
    parts += ["## Cold start and logging", cold_start_table(results)]
    if results["levers"] or lever_servers(results):
        parts += ["## Levers", levers_table(results)]
    return "\n\n".join(parts) + "\n"


def readme_section(results: dict) -> str:
    """The README's "What it measured here", from one run (paste it after a quiet full run)."""
    env = results["environment"]
    load = env.get("load_average_start"), env.get("load_average_end")
    setting = "QUICK setting" if results["settings"]["quick"] else "full setting"
    return "\n\n".join([
        f"One `make bench` ({setting}) on {env['cpus']} CPUs ({env['processor']}), started "
        f"{env['started_at']}, load average {load[0]} at the start and {load[1]} at the end; "
        f"gRPC and REST against the same TorchServe {env['torchserve']}, same images, same "
        f"run (`build/bench/results.md` has every figure; a tie is within "
        f"{analysis.TIE_TOLERANCE:.0%}).",
        "\n".join(f"- {line}" for line in results["why_grpc"]["takeaways"]),
        decision_table(results),
    ]) + "\n"


def write_results(results: dict, out_dir: Path) -> dict[str, str]:
    """Write why_grpc.json, results.json/.csv/.md and the figures; return their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"why_grpc": out_dir / WHY_GRPC_JSON, "json": out_dir / RESULTS_JSON,
             "csv": out_dir / RESULTS_CSV, "markdown": out_dir / RESULTS_MD}
    for name, draw in figures.FIGURES.items():
        figure = draw(results, save_to=out_dir / f"{name}.png")
        if figure is not None:
            files[f"{name}_png"] = out_dir / f"{name}.png"
    files = {name: str(path) for name, path in files.items()}
    results["files"] = files
    Path(files["why_grpc"]).write_text(json.dumps(results["why_grpc"], indent=1))
    Path(files["json"]).write_text(json.dumps(results, indent=1, default=_plain))
    with open(files["csv"], "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=ROW_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(results["rows"])
    Path(files["markdown"]).write_text(report(results))
    return files


def _plain(value: object) -> object:
    if isinstance(value, np.generic):
        return value.item()
    return str(value)
