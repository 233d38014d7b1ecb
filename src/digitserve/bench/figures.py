"""The benchmark's figures: plain millisecond axes from zero, every line labelled, legends
outside the data. Each function takes the results, returns a ``Figure`` (or None when the run
did not measure what it shows) and writes it as a PNG when given ``save_to``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from digitserve.bench import analysis
from digitserve.plots import save_figure

COLORS = {"grpc": "tab:blue", "rest": "tab:orange", "in-process": "black"}
NAMES = {"grpc": "gRPC", "rest": "REST", "in-process": "in-process (the floor)"}


def _legend_below(ax, columns: int = 3) -> None:
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=columns, fontsize=8,
              frameon=False)


def latency(results: dict, save_to: Path | None = None) -> Figure | None:
    """One caller: the share of calls answered within x ms, per main server, beside the floor."""
    servers = list(dict.fromkeys(r["config"] for r in results["rows"] if r["kind"] == "main"))
    if not servers:
        return None
    floor = next((r for r in results["rows"] if r["kind"] == "floor" and r["images_per_call"] == 1
                  and r["torch_threads"] == results["floor"]["torch_threads"]), None)
    fig = Figure(figsize=(5.5 * len(servers), 4.2), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(servers), sharex=True))
    for ax, label in zip(axes, servers, strict=True):
        curves = [floor] + [r for r in results["rows"] if r["kind"] == "main"
                            and r["config"] == label and r["concurrency"] == 1]
        for row in curves:
            samples = np.sort(results["samples"].get(row["id"], [])) if row else []
            if not len(samples):
                continue
            ax.plot(samples, np.arange(1, len(samples) + 1) / len(samples),
                    color=COLORS[row["mode"]],
                    label=f"{NAMES[row['mode']]}: p50 {row['p50_ms']:.1f} ms, "
                          f"p99 {row['p99_ms']:.1f} ms")
        ax.set(title=label, xlabel="milliseconds per call", ylabel="share of calls this fast")
        ax.set_xlim(left=0)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        _legend_below(ax, 1)
    fig.suptitle("One caller at a time: how far each protocol sits from the in-process floor")
    return save_figure(fig, save_to)


def throughput(results: dict, save_to: Path | None = None) -> Figure | None:
    """Images per second against callers, gRPC and REST, on each main server."""
    rows = [r for r in results["rows"] if r["kind"] == "main"]
    if not rows:
        return None
    fig = Figure(figsize=(7, 4.2), layout="constrained")
    ax = fig.subplots()
    callers = sorted({r["concurrency"] for r in rows})
    styles = ["-", "--", ":", "-."]
    for index, label in enumerate(dict.fromkeys(r["config"] for r in rows)):
        for mode in ("grpc", "rest"):
            mine = sorted((r for r in rows if r["config"] == label and r["mode"] == mode),
                          key=lambda r: r["concurrency"])
            ax.plot([callers.index(r["concurrency"]) for r in mine],
                    [r["throughput_rps"] for r in mine], "o" + styles[index % len(styles)],
                    color=COLORS[mode], label=f"{NAMES[mode]}, {label}")
    f = results["floor"]
    ax.axhline(f["batch_throughput_rps"], color="black", lw=1, ls="--",
               label=f"in-process, batches of {f['batch_size']}")
    ax.set_xticks(range(len(callers)), [str(c) for c in callers])
    ax.set(xlabel="callers at once (threads, one call each)", ylabel="images per second",
           title="Throughput: TorchServe and the callers share this machine's CPUs")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    _legend_below(ax, 2)
    return save_figure(fig, save_to)


def connection_reuse(results: dict, save_to: Path | None = None) -> Figure | None:
    """p50 of one caller for each way of connecting, plaintext and over TLS."""
    found = results["situations"].get("connection_reuse") or {}
    if not found:
        return None
    variants = [("grpc_channel", "gRPC, one channel"), ("grpc_new_channel", "gRPC, new channel"),
                ("rest_keep_alive", "REST, kept alive"),
                ("rest_new_connection", "REST, new connection")]
    fig = Figure(figsize=(7.5, 3.8), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / len(found)
    for index, (key, data) in enumerate(found.items()):
        x = np.arange(len(variants)) + (index - (len(found) - 1) / 2) * width
        values = [data[name]["p50_ms"] for name, _ in variants]
        bars = ax.bar(x, values, width, color=["tab:blue", "tab:blue", "tab:orange",
                                               "tab:orange"],
                      hatch="//" if key == "tls" else None, edgecolor="black")
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_xticks(range(len(variants)), [name for _, name in variants])
    ax.set(ylabel="p50 milliseconds, one caller",
           title="Connection reuse: what a new connection costs")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3, axis="y")
    handles = [Patch(facecolor="white", edgecolor="black", hatch="//" if key == "tls" else None,
                     label="over TLS" if key == "tls" else "plaintext") for key in found]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2,
              fontsize=8, frameon=False)
    return save_figure(fig, save_to)


def many_callers(results: dict, save_to: Path | None = None) -> Figure | None:
    """Throughput and p99 at each number of calls in flight, with connections opened."""
    levels = results["situations"].get("many_callers") or []
    if not levels:
        return None
    fig = Figure(figsize=(10, 3.8), layout="constrained")
    axes = fig.subplots(1, 2)
    x = np.arange(len(levels))
    for ax, key, label in ((axes[0], "throughput_rps", "images per second"),
                           (axes[1], "p99_ms", "p99 milliseconds")):
        for offset, mode in ((-0.2, "grpc"), (0.2, "rest")):
            bars = ax.bar(x + offset, [level[mode][key] for level in levels], 0.4,
                          color=COLORS[mode], label=f"{NAMES[mode]} "
                          f"({'grpc.aio, one channel' if mode == 'grpc' else 'aiohttp pool'})")
            ax.bar_label(bars, [f"{level[mode][key]:.0f}\n{level[mode]['connections']} conn."
                                for level in levels], fontsize=7)
        ax.set_xticks(x, [f"{level['in_flight']} in flight" for level in levels])
        ax.set(ylabel=label)
        ax.set_ylim(0, ax.get_ylim()[1] * 1.2)
        ax.grid(alpha=0.3, axis="y")
    _legend_below(axes[0], 2)
    fig.suptitle("Many callers: one HTTP/2 connection against a pool of HTTP/1.1 connections")
    return save_figure(fig, save_to)


def payload(results: dict, save_to: Path | None = None) -> Figure | None:
    """p50 against the PNG's size on the wire (same digit, padded), gRPC and REST."""
    rows = results["situations"].get("payload") or []
    if not rows:
        return None
    fig = Figure(figsize=(6.5, 4), layout="constrained")
    ax = fig.subplots()
    sizes = sorted({r["payload_bytes"] for r in rows})
    for mode in ("grpc", "rest"):
        mine = sorted((r for r in rows if r["mode"] == mode), key=lambda r: r["payload_bytes"])
        ax.plot([sizes.index(r["payload_bytes"]) for r in mine], [r["p50_ms"] for r in mine],
                "o-", color=COLORS[mode], label=f"{NAMES[mode]}, p50")
    ax.set_xticks(range(len(sizes)), [_size(s) for s in sizes])
    ax.set(xlabel="the PNG on the wire (same digit, padded)", ylabel="p50 milliseconds",
           title="Payload size, one caller")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    _legend_below(ax, 2)
    return save_figure(fig, save_to)


def _size(size: float) -> str:
    for unit, scale in (("MB", 1e6), ("KB", 1e3)):
        if size >= scale:
            return f"{size / scale:.0f} {unit}"
    return f"{size:.0f} B"


PART_COLORS = ("tab:blue", "tab:purple", "tab:red", "tab:olive", "tab:cyan", "tab:green")


def time_breakdown(results: dict, save_to: Path | None = None) -> Figure | None:
    """Where the time of one call goes, gRPC and REST, stacked from the client to the model."""
    parts = analysis.breakdown(results)
    modes = [m for m in ("grpc", "rest") if m in parts]
    if not modes:
        return None
    fig = Figure(figsize=(9, 2.6 + 0.5 * len(modes)), layout="constrained")
    ax = fig.subplots()
    for y, mode in enumerate(modes):
        left = 0.0
        for index, part in enumerate(parts[mode]["parts"]):
            label = part["part"] if mode == "grpc" or index else part["part"]
            bar = ax.barh(y, part["ms"], left=left, color=PART_COLORS[index],
                          edgecolor="white", label=label)
            if part["ms"] > 0.06 * parts[mode]["total_ms"]:
                ax.bar_label(bar, [f"{part['ms']:.1f}"], label_type="center", fontsize=8,
                             color="white")
            left += part["ms"]
        ax.text(left, y, f"  {parts[mode]['total_ms']:.1f} ms", va="center", fontsize=9)
    ax.set_yticks(range(len(modes)), [NAMES[m] for m in modes])
    ax.invert_yaxis()
    ax.set_xlim(0, max(parts[m]["total_ms"] for m in modes) * 1.15)
    ax.set(xlabel="milliseconds (trimmed means of the same calls)",
           title="Where the time of one call goes (one caller, batching off)")
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    ax.legend(unique.values(), unique.keys(), loc="upper center", bbox_to_anchor=(0.5, -0.3),
              ncol=3, fontsize=8, frameon=False)
    return save_figure(fig, save_to)


def on_the_wire(results: dict, save_to: Path | None = None) -> Figure | None:
    """One gRPC call's HTTP/2 frames beside one REST call's request and response, real sizes."""
    wire = results["situations"].get("on_the_wire")
    if not wire:
        return None
    grpc_blocks, rest_blocks = _grpc_blocks(wire), _rest_blocks(wire)
    gap = 1.6  # lines between two boxes
    lines = max(sum(len(text.splitlines()) + gap for text, _ in blocks)
                for blocks in (grpc_blocks, rest_blocks))
    fig = Figure(figsize=(15, 0.135 * lines + 0.9), layout="constrained")
    for ax, blocks, title in zip(fig.subplots(1, 2), (grpc_blocks, rest_blocks),
                                 ("gRPC: one Predictions call on an HTTP/2 connection",
                                  "REST: one POST on an HTTP/1.1 connection"), strict=True):
        ax.set_axis_off()
        ax.set_ylim(lines, 0)
        ax.set_xlim(0, 1)
        ax.set_title(title, fontsize=11, loc="left")
        y = 0.2
        for text, color in blocks:
            ax.text(0.01, y, text, va="top", ha="left", family="monospace", fontsize=7.5,
                    bbox={"boxstyle": "round,pad=0.4", "fc": color, "ec": "0.4"})
            y += len(text.splitlines()) + gap
    fig.suptitle(f"One call on the wire, this run's bytes (a {wire['image_bytes']}-byte PNG; "
                 "long header values cut, the token shown by its length)",
                 fontsize=11)
    return save_figure(fig, save_to)


def _cut(text: str, width: int = 84) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"


def _grpc_blocks(wire: dict) -> list[tuple[str, str]]:
    first, second = wire["grpc"]
    blocks = []
    for direction, frames, color in (("client → TorchServe", first["request"], "#dbe9f6"),
                                     ("TorchServe → client", first["response"], "#fde4cc")):
        for frame in frames:
            if frame["type"] == "HEADERS":
                trailers = direction.startswith("TorchServe") and frame.get("end_stream")
                name = "HEADERS (trailers)" if trailers else "HEADERS"
                body = "\n".join(_cut(f"  {k}: {v}") for k, v in frame["headers"])
                blocks.append((f"{direction}  {name} frame, {frame['bytes']} B "
                               f"(9-byte frame header + HPACK)\n{body}", color))
            elif frame["type"] == "DATA" and "message_bytes" in frame:
                what = ("PredictionsRequest: model_name + input{'data': the PNG}"
                        if direction.startswith("client") else
                        "PredictionResponse: prediction = the handler's JSON answer")
                blocks.append((f"{direction}  DATA frame, {frame['bytes']} B\n"
                               f"  9-byte frame header + 5-byte gRPC prefix (compressed flag, "
                               f"length)\n  + {frame['message_bytes']} B protobuf: {what}",
                               color))
            else:
                blocks.append((f"{direction}  {frame['type']} frame, {frame['bytes']} B "
                               "(flow control)", color))
    total_sent = sum(f["bytes"] for f in first["request"])
    total_received = sum(f["bytes"] for f in first["response"])
    again = [f["bytes"] for f in second["request"] if f["type"] == "HEADERS"]
    blocks.append((f"this call: {total_sent} B sent, {total_received} B received "
                   f"(+ {first['connection_bytes']['sent']} B / "
                   f"{first['connection_bytes']['received']} B once per connection:\n"
                   "  preface, SETTINGS, WINDOW_UPDATE, PING)\n"
                   f"the next call on this connection: HEADERS {again[0] if again else '?'} B "
                   "(HPACK sends headers it has sent before as table indexes)", "#eeeeee"))
    return blocks


def _rest_blocks(wire: dict) -> list[tuple[str, str]]:
    first, second = wire["rest"]
    request, response = first["request"], first["response"]
    blocks = [
        (f"client → TorchServe  request head, {request['head_bytes']} B (text)\n  "
         + "\n  ".join(_cut(line) for line in [request["first_line"], *request["headers"]]),
         "#dbe9f6"),
        (f"client → TorchServe  body, {request['body_bytes']} B: the PNG as it is "
         "(TorchServe reads the whole body before it queues the request)", "#dbe9f6"),
        (f"TorchServe → client  response head, {response['head_bytes']} B\n  "
         + "\n  ".join(_cut(line) for line in [response["first_line"], *response["headers"]]),
         "#fde4cc"),
        (f"TorchServe → client  body, {response['body_bytes']} B: the handler's JSON answer",
         "#fde4cc"),
        (f"this call: {request['bytes']} B sent, {response['bytes']} B received\n"
         f"the next call on this connection: head {second['request']['head_bytes']} B "
         "(HTTP/1.1 sends every header again)", "#eeeeee"),
    ]
    return blocks


FIGURES = {"latency": latency, "throughput": throughput, "connection_reuse": connection_reuse,
           "many_callers": many_callers, "payload": payload, "time_breakdown": time_breakdown,
           "on_the_wire": on_the_wire}
