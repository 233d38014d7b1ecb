"""From measurements to answers: gRPC against REST per situation, where a call's time goes,
the decision table and the sentences that quote them. Pure functions of the results dict.

A verdict compares two figures of the same measure: ``ratio`` is gRPC ÷ REST, and the two are
a ``tie`` when they are within ``TIE_TOLERANCE`` (10 %) of each other; otherwise the better one
wins (lower for times, bytes, connections and CPU; higher for throughput).
"""

from __future__ import annotations

import math

from digitserve.bench.settings import TIE_TOLERANCE

GRPC, REST = "grpc", "rest"


def verdict(grpc: float | None, rest: float | None, higher_is_better: bool = False) -> dict:
    """``better`` ("grpc", "rest" or "tie") and ``ratio`` (gRPC ÷ REST) for two figures."""
    if grpc is None or rest is None or _nan(grpc) or _nan(rest):
        return {"better": "tie", "ratio": None}
    if grpc == rest:
        return {"better": "tie", "ratio": 1.0}
    if rest == 0 or grpc == 0:
        ratio = None
        grpc_higher = grpc > rest
    else:
        ratio = round(grpc / rest, 3)
        if abs(ratio - 1) <= TIE_TOLERANCE:
            return {"better": "tie", "ratio": ratio}
        grpc_higher = ratio > 1
    return {"better": GRPC if grpc_higher == higher_is_better else REST, "ratio": ratio}


def _nan(value: float) -> bool:
    return isinstance(value, float) and math.isnan(value)


def _row(key: str, situation: str, measure: str, unit: str, grpc: float | None,
         rest: float | None, higher_is_better: bool = False) -> dict:
    """One comparison; ``id`` names the situation for programs (one id, several measures)."""
    return {"id": key, "situation": situation, "measure": measure, "unit": unit, "grpc": grpc,
            "rest": rest, **verdict(grpc, rest, higher_is_better)}


def situation_rows(results: dict) -> list[dict]:
    """Every gRPC-against-REST comparison this run measured, one row per measure."""
    found = results.get("situations", {})
    rows = []
    reuse = found.get("connection_reuse", {})
    for key, where in (("plaintext", "plaintext"), ("tls", "over TLS")):
        r = reuse.get(key)
        if not r:
            continue
        rows.append(_row(f"connection_reuse_{key}", f"connection reuse, {where}: REST opens "
                         "a connection per call, gRPC keeps one channel",
                         "p50 latency, one caller", "ms",
                         r["grpc_channel"]["p50_ms"], r["rest_new_connection"]["p50_ms"]))
        rows.append(_row(f"new_connection_both_{key}",
                         f"a new connection for every call, both, {where}",
                         "p50 latency, one caller", "ms", r["grpc_new_channel"]["p50_ms"],
                         r["rest_new_connection"]["p50_ms"]))
        if key == "plaintext":
            rows += _rest_as_good(r)
    for level in found.get("many_callers", []):
        where = f"many callers: {level['in_flight']} calls in flight"
        key = f"many_callers_{level['in_flight']}"
        g, r = level[GRPC], level[REST]
        rows += [
            _row(key, where, "throughput", "images/s", g["throughput_rps"], r["throughput_rps"],
                 higher_is_better=True),
            _row(key, where, "p50 latency", "ms", g["p50_ms"], r["p50_ms"]),
            _row(key, where, "p99 latency", "ms", g["p99_ms"], r["p99_ms"]),
            _row(key, where, "connections open", "connections", g["connections"],
                 r["connections"]),
            _row(key, where, "client CPU per call", "ms", g["client_cpu_ms"],
                 r["client_cpu_ms"]),
        ]
    deadline = found.get("deadlines")
    if deadline:
        where = (f"deadlines: {deadline['calls']} calls give up after "
                 f"{deadline['deadline_ms']} ms, the batch waits {deadline['batch_delay_ms']} ms")
        rows += [
            _row("deadlines", where, "time until the caller knows", "ms",
                 deadline[GRPC]["ms_to_error_p50"], deadline[REST]["ms_to_error_p50"]),
            _row("deadlines", where, "abandoned calls the worker still ran", "calls",
                 deadline[GRPC]["worker_ran"], deadline[REST]["worker_ran"]),
        ]
    payload = found.get("payload") or []
    if payload:
        largest = max(row["payload_bytes"] for row in payload)
        by_mode = {row["mode"]: row for row in payload if row["payload_bytes"] == largest}
        if GRPC in by_mode and REST in by_mode:
            rows.append(_row("payload",
                             f"payload: the digit padded to a {_size(largest)} PNG",
                             "p50 latency, one caller", "ms", by_mode[GRPC]["p50_ms"],
                             by_mode[REST]["p50_ms"]))
    encoding = found.get("encoding")
    if encoding:
        where = "encoding: 784 pixels as a typed tensor (gRPC, OIP) or a JSON list (REST)"
        rows += [
            _row("encoding", where, "request body", "bytes", encoding[GRPC]["body_bytes"],
                 encoding[REST]["body_bytes"]),
            _row("encoding", where, "p50 latency, one caller", "ms",
                 encoding[GRPC]["p50_ms"], encoding[REST]["p50_ms"]),
        ]
    return rows


def _rest_as_good(reuse: dict) -> list[dict]:
    """One caller, kept-alive connection, small image: the case REST is built for."""
    where = "one caller, connection kept alive, a small PNG"
    g, r = reuse["grpc_channel"], reuse["rest_keep_alive"]
    key = "rest_as_good"
    rows = [_row(key, where, "p50 latency", "ms", g["p50_ms"], r["p50_ms"]),
            _row(key, where, "client CPU per call", "ms", g["client_cpu_ms"],
                 r["client_cpu_ms"]),
            _row(key, where, "server CPU per call", "ms", g["server_cpu_ms"],
                 r["server_cpu_ms"])]
    wire = reuse.get("wire") or {}
    if wire.get("grpc_channel") and wire.get("rest_keep_alive"):
        rows.append(_row(key, where, "bytes on the wire per call (both ways)", "bytes",
                         wire["grpc_channel"]["bytes_per_call"],
                         wire["rest_keep_alive"]["bytes_per_call"]))
    return rows


def _size(size: float) -> str:
    for unit, scale in (("MB", 1e6), ("KB", 1e3)):
        if size >= scale:
            return f"{size / scale:.0f} {unit}"
    return f"{size:.0f}-byte"


#: The parts of one call, in the order they are stacked (client first).
PARTS = ("client and protocol", "frontend: queue and dispatch", "worker socket and Python loop",
         "handler: answer and JSON", "reading the image", "the model's forward pass")


def breakdown(results: dict) -> dict:
    """Where a lone call's time goes, for gRPC and for REST (trimmed means, milliseconds).

    Sources: the client's own timing (the whole call); TorchServe's log lines for the same
    calls (time in the frontend from queueing to answer, the worker round trip, the handler's
    ``PredictionTime``); and the in-process floor for the handler's two halves (reading the
    image, the model). When the floor's two halves add up to more than the handler's own time
    (the floor ran at another moment of a busy machine), they are scaled down to fit it, in
    their proportion (``floor_scaled``). A part that comes out below zero (the sources' clocks
    differ a little) is shown as zero.
    """
    reuse = results.get("situations", {}).get("connection_reuse", {}).get("plaintext")
    floor = results.get("floor")
    if not reuse or not floor:
        return {}
    out = {"floor_threads": floor["torch_threads"]}
    for mode, key, protocol in ((GRPC, "grpc_channel", "HTTP/2 + protobuf"),
                                (REST, "rest_keep_alive", "HTTP/1.1")):
        measured, log = reuse[key], reuse[key].get("server_log") or {}
        needed = ("in_frontend_ms", "worker_round_trip_ms", "handler_ms")
        if any(log.get(name) is None for name in needed):
            continue
        client = measured.get("trimmed_mean_ms") or measured["mean_ms"]
        read, model = floor["preprocess_p50_ms"], floor["forward_p50_ms"]
        scaled = min(1.0, log["handler_ms"] / (read + model)) if read + model else 1.0
        read, model = read * scaled, model * scaled
        values = (client - log["in_frontend_ms"],
                  log["in_frontend_ms"] - log["worker_round_trip_ms"],
                  log["worker_round_trip_ms"] - log["handler_ms"],
                  log["handler_ms"] - read - model, read, model)
        out[mode] = {
            "total_ms": round(client, 3),
            "protocol": protocol,
            "parts": [{"part": name, "ms": round(max(value, 0.0), 3)}
                      for name, value in zip(PARTS, values, strict=True)],
            "requests_logged": log.get("requests_logged"),
            "floor_scaled": round(scaled, 3),
        }
    return out


def served_overhead(parts: dict) -> tuple[float, float]:
    """(milliseconds TorchServe adds outside the handler, its share of the call)."""
    added = sum(p["ms"] for p in parts["parts"][1:3])
    return added, added / parts["total_ms"] if parts["total_ms"] else 0.0


#: How the decision table names each situation (by its ``id``).
SHORT = {
    "connection_reuse_plaintext": "the client would otherwise open a connection per call",
    "connection_reuse_tls": "over TLS, the client would otherwise open a connection per call",
    "new_connection_both_plaintext": "both sides open a new connection for every call",
    "new_connection_both_tls": "both open a new connection for every call, over TLS",
    "rest_as_good": "one caller, a kept-alive connection, a small image",
    "deadlines": "the caller gives up before the server answers",
    "payload": "the payload is large",
    "encoding": "the client holds pixels, not an image file",
}


def decision(rows: list[dict]) -> dict[str, list[str]]:
    """"Use gRPC when…" and "REST is as good when…": one line per situation and column,
    quoting this run's figures (gRPC first, then REST)."""
    columns: dict[str, dict[str, list[str]]] = {GRPC: {}, REST: {}}
    for row in rows:
        name = SHORT.get(row["id"]) or row["situation"]
        if row["id"].startswith("many_callers_"):
            name = f"{row['id'].rsplit('_', 1)[1]} calls are in flight at once"
        figure = (f"{row['measure']} {_num(row['grpc'])} vs {_num(row['rest'])} "
                  f"{row['unit']}")
        column = GRPC if row["better"] == GRPC else REST
        if row["better"] == REST:
            figure += " (REST better)"
        columns[column].setdefault(name, []).append(figure)
    return {key: [f"{name}: {'; '.join(figures)}" for name, figures in columns[mode].items()]
            for key, mode in (("use_grpc_when", GRPC), ("rest_as_good_when", REST))}


def takeaways(results: dict, rows: list[dict]) -> list[str]:
    """Three or four sentences about this run, each quoting its figures."""
    out = []
    counts = {k: sum(r["better"] == k for r in rows) for k in (GRPC, REST, "tie")}
    if rows:
        out.append(f"Of {len(rows)} comparisons in this run, gRPC did better in {counts[GRPC]}, "
                   f"REST in {counts[REST]}, and {counts['tie']} were ties (within "
                   f"{TIE_TOLERANCE:.0%} of each other).")
    wins = [r for r in rows if r["better"] == GRPC and r["ratio"]]
    if wins:
        best = max(wins, key=lambda r: max(r["ratio"], 1 / r["ratio"]))
        factor = max(best["ratio"], 1 / best["ratio"])
        out.append(f"gRPC's clearest win: {best['situation']} ({best['measure']}: "
                   f"{_num(best['grpc'])} against {_num(best['rest'])} {best['unit']}, "
                   f"×{factor:.1f}).")
    lone = next((r for r in rows if r["situation"].startswith("one caller")
                 and r["measure"] == "p50 latency"), None)
    if lone:
        word = {"tie": "as fast as", GRPC: "slower than", REST: "faster than"}[lone["better"]]
        out.append(f"For one caller on a kept-alive connection with a small image, REST was "
                   f"{word} gRPC: p50 {_num(lone['rest'])} ms against {_num(lone['grpc'])} ms.")
    parts = breakdown(results).get(GRPC)
    if parts:
        added, share = served_overhead(parts)
        model = parts["parts"][-1]["ms"] + parts["parts"][-2]["ms"]
        out.append(f"Of a lone gRPC call's {parts['total_ms']:.1f} ms, reading the image and "
                   f"the forward pass take {model:.1f} ms; TorchServe's frontend, queue and "
                   f"worker socket add {added:.1f} ms ({share:.0%}), whichever protocol "
                   "carries the call.")
    deadline = results.get("situations", {}).get("deadlines")
    if deadline:
        out.append(f"A deadline frees the caller, not the server: {deadline[GRPC]['expired']} "
                   f"gRPC calls and {deadline[REST]['expired']} REST calls of "
                   f"{deadline['calls']} gave up, and TorchServe's worker still ran "
                   f"{deadline[GRPC]['worker_ran']} and {deadline[REST]['worker_ran']} of them.")
    return out


def _num(value: float | None) -> str:
    if value is None:
        return "–"
    if float(value).is_integer():
        return f"{value:,.0f}"
    return f"{value:,.2f}" if abs(value) < 100 else f"{value:,.0f}"


def why_grpc(results: dict) -> dict:
    """The document ``why_grpc.json`` holds (see ``digitserve.bench.run.WHY_GRPC_JSON``)."""
    rows = situation_rows(results)
    return {"situations": rows, "live_drawing": results.get("live_drawing"),
            "tie_tolerance": TIE_TOLERANCE, "decision": decision(rows),
            "takeaways": takeaways(results, rows), "quick": results["settings"]["quick"]}
