"""Markdown for the benchmark: one table per shape, the machine, the versions, the date."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess

import jax
import peers

MODES = ("inference", "training", "fwd+bwd")
PACKAGES = ("jax", "jaxlib", "numpy", "bnjax", "flax", "dm-haiku", "equinox", "keras")


def _ms(seconds) -> str:
    return "–" if seconds is None else f"{seconds * 1e3:.3f}"


def _ratio(a, b) -> str:
    return "–" if a is None or not b else f"{a / b:.2f}"


def _mib(nbytes) -> str:
    if nbytes is None:
        return "–"
    return f"{nbytes / 2**10:.1f} KiB" if nbytes < 2**20 else f"{nbytes / 2**20:.1f} MiB"


def case_table(rows) -> str:
    """A Markdown table of one case's rows (``{name: row}`` from ``run.measure_case``)."""
    base = rows.get("bnjax", {}).get("time", {})
    roof = rows["roofline"]["time"]["inference"]
    head = ["implementation"]
    for mode in MODES:
        head += [f"{mode} ms", "×bnjax", "×roofline"]
    head += ["temp memory (inf / train / fwd+bwd)", "compile s", "variance rel. error"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in rows.items():
        if "error" in row:
            lines.append(f"| {name} | failed: {row['error']} |" + " |" * (len(head) - 2))
            continue
        cells = [name]
        for mode in MODES:
            t = row.get("time", {}).get(mode)
            cells += [_ms(t), _ratio(t, base.get(mode)), _ratio(t, roof)]
        temps = " / ".join(_mib(row["temp"].get(m)) for m in MODES)
        err = row.get("var_error")
        cells += [temps, f"{row['compile']:.2f}", "–" if err is None else f"{err:.1e}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# bnjax's targets: inference time / roofline, and training, fwd+bwd time / fastest peer.
TARGETS = {"inference": 1.05, "training": 0.9, "fwd+bwd": 0.8}


def _verdict(ratio, target) -> str:
    return f"target ≤ {target:.2f}: {'met' if ratio <= target else 'missed'}"


def peer_summary(rows) -> str:
    """bnjax against its targets: the roofline, the fastest peer per mode, the memory."""
    names = [
        n for n in rows if not n.startswith("bnjax") and n != "roofline" and "error" not in rows[n]
    ]
    if "bnjax" not in rows or "error" in rows["bnjax"] or not names:
        return ""
    ours = rows["bnjax"]
    ratio = ours["time"]["inference"] / rows["roofline"]["time"]["inference"]
    out = [f"- inference: bnjax takes {ratio:.2f}× the roofline ({_verdict(ratio, 1.05)})"]
    for mode in MODES:
        best = min(names, key=lambda n: rows[n]["time"][mode])
        ratio = ours["time"][mode] / rows[best]["time"][mode]
        line = f"- {mode}: bnjax takes {ratio:.2f}× the time of the fastest peer ({best})"
        if mode != "inference":
            line += f" ({_verdict(ratio, TARGETS[mode])})"
        out.append(line)
    for mode in MODES:
        smallest = min(names, key=lambda n: rows[n]["temp"][mode] or 0)
        mine, theirs = ours["temp"][mode] or 0, rows[smallest]["temp"][mode] or 0
        out.append(
            f"- {mode} temporary memory: bnjax {_mib(mine)}, smallest peer "
            f"{_mib(theirs)} ({smallest}) ({'met' if mine <= theirs else 'missed'})"
        )
    return "\n".join(out + _paths(rows))


def _paths(rows) -> list[str]:
    """The branchless path's time as a multiple of the checked path's, per mode."""
    a, b = rows.get("bnjax branchless"), rows.get("bnjax checked")
    if not a or not b or "error" in a or "error" in b:
        return []
    ratios = ", ".join(f"{m} {a['time'][m] / b['time'][m]:.2f}×" for m in MODES)
    return [f"- statistics paths: branchless / checked time: {ratios}"]


def cpu_model() -> str:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        text = ""
    for line in text.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def document(results, impls, args) -> str:
    """The whole RESULTS.md text for ``{(shape, dtype): rows}``."""
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    names = sorted({i.package for i in impls} | set(PACKAGES))
    versions = ", ".join(f"{p} {peers.version(p)}" for p in names)
    parts = [
        "# bnjax benchmark results",
        "",
        f"- date: {now}",
        f"- machine: {cpu_model()}, {os.cpu_count()} cores; backend {jax.default_backend()} "
        f"({jax.devices()[0].device_kind})",
        f"- versions: {versions}",
        f"- method: `python benchmarks/run.py` with {args.rounds} interleaved rounds of "
        f"{args.repeats} calls; times are medians over rounds of each round's fastest call, "
        "in milliseconds, every function "
        "compiled with `jax.jit`. Ratios: ×bnjax is time / bnjax's time in the same mode; "
        "×roofline is time / the time of `x * a + b` (per-feature affine) on the same input.",
        "- modes: inference forward; training forward (output and new state); training "
        "forward+backward (output, new state, gradients with respect to x, scale and bias "
        'for a random cotangent). bnjax is `statistics="auto"` (what this backend runs); '
        "`bnjax checked` and `bnjax branchless` force each statistics path.",
        "- temp memory: `compiled.memory_analysis().temp_size_in_bytes`; compile s: lowering and "
        "compiling the three modes; variance rel. error: max over features of the relative "
        "error of the first batch's variance on float32 data of the table's shape with mean "
        "1e3 and std 0.1, against float64.",
    ]
    for case, rows in results.items():
        parts += ["", f"## {case.title()}", "", case_table(rows), "", peer_summary(rows)]
    return "\n".join(parts) + "\n"
