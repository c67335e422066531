"""GPU check: bnjax against Flax, Equinox and Haiku in one run that keeps to a time budget.

Made for one command on a machine with one GPU (``benchmarks/gpu_check.sh``, or
``python benchmarks/gpu_check.py --out DIR``) under a hard limit of a few minutes. It
measures, in one process:

* **bnjax** ``BatchNorm(statistics="auto")`` (what a GPU user gets) next to
  ``flax.linen.BatchNorm``, ``equinox.nn.BatchNorm(mode="batch")`` (under a named
  ``jax.vmap``, as Equinox requires) and ``haiku.BatchNorm``; a peer that does not import
  is left out with a note;
* shapes ``(256, 56, 56, 64)`` and ``(4096, 1024)`` (features last), float32 and bfloat16;
* modes ``training`` (forward: output and new state) and ``fwd+bwd`` (also the gradients
  with respect to x, scale and bias for a random cotangent), the functions of
  ``run.mode_functions``;
* for every compiled function: the ``conditional`` ops left in the optimized HLO (bnjax's
  must be 0 off CPU: an XLA:GPU conditional copies its predicate to the host), and the
  compiled temporary and peak memory (``compiled.memory_analysis()``).

Timing: every function is compiled with ``jax.jit``, called twice to warm up, then timed
in interleaved rounds whose order rotates by one each round. In a round each function runs
``--repeats`` times back to back and is blocked on once (``jax.block_until_ready``), so
the device queue stays full and the sample is device time per call rather than one host
round trip per call; the time to enqueue the calls is kept too, and a function whose
enqueueing takes most of its time is marked host-bound. Tables show medians over rounds
and ratios to bnjax's time.

Budget: ``--budget-s`` (default 300) counts from the start of the process. Phase 1
compiles bnjax's functions for every case (the conditionals and memory: the part that must
not be lost); phase 2 goes case by case, compiling the peers and timing. Before each
compile and each round the script checks that the time left, less a reserve for writing
the report, covers the longest compile or round seen so far (times 1.5); when it does not,
it stops there and writes what it has. A watchdog thread writes the report and exits
(status 3) if one compile or call overruns the budget by more than its grace.

``--smoke`` runs tiny shapes with 2 rounds (a CPU test of the whole script). The report,
``RESULTS-gpu-<YYYY-MM-DD>.md`` in ``--out`` (default ``benchmarks/``), is also printed to
stdout; progress goes to stderr.
"""

from __future__ import annotations

import time

_START = time.perf_counter()  # the budget counts from here, before jax is imported

import argparse  # noqa: E402
import datetime  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
from pathlib import Path  # noqa: E402

BENCH = Path(__file__).resolve().parent
# This checkout's bnjax is the one measured, installed or not; its helpers beside it.
sys.path[:0] = [str(BENCH), str(BENCH.parent)]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import peers  # noqa: E402
import report  # noqa: E402
import run  # noqa: E402

import bnjax  # noqa: E402

SHAPES = ((256, 56, 56, 64), (4096, 1024))
SMOKE_SHAPES = ((8, 4, 4, 8), (64, 16))
DTYPES = ("float32", "bfloat16")
MODES = ("training", "fwd+bwd")
WARMUP_CALLS = 2
# The peers, by factory: a missing library or a failing build is a note, not an error.
PEER_FACTORIES = {
    "flax.linen": peers._linen,
    "equinox batch": lambda: peers._equinox("batch"),
    "haiku": peers._haiku,
}
CONDITIONAL = re.compile(r"\bconditional\(")


def log(message):
    print(f"[{time.perf_counter() - _START:6.1f} s] {message}", file=sys.stderr, flush=True)


class Budget:
    """The time left before ``deadline`` (a ``time.perf_counter()`` value), less ``reserve``."""

    def __init__(self, seconds, reserve):
        self.deadline = _START + seconds
        self.reserve = reserve
        self.stopped = None  # why the run stopped early, if it did

    def left(self):
        return self.deadline - time.perf_counter() - self.reserve

    def allows(self, seconds, what):
        """Whether ``seconds`` of work still fit; the first refusal is recorded."""
        if self.left() >= seconds:
            return True
        if self.stopped is None:
            self.stopped = (
                f"{self.left():.1f} s left (less {self.reserve:.0f} s kept for the report) "
                f"before {what}, expected to take {seconds:.1f} s"
            )
            log(f"stopping: {self.stopped}")
        return False


class Estimate:
    """The longest duration seen of one kind of work, times a margin (0 until one is seen)."""

    def __init__(self, margin=1.5):
        self.longest, self.margin = 0.0, margin

    def __call__(self):
        return self.longest * self.margin

    def saw(self, seconds):
        self.longest = max(self.longest, seconds)


def conditionals(compiled):
    """The number of ``conditional`` ops in the optimized HLO of ``compiled``."""
    return len(CONDITIONAL.findall(compiled.as_text()))


def memory(compiled):
    """``{"temp", "peak"}`` bytes of ``compiled`` (None where the backend does not say).

    Without a peak figure, the peak is bounded by arguments + outputs + temporaries - aliased
    bytes, reported as ``("≈", bytes)``.
    """
    try:
        stats = compiled.memory_analysis()
    except Exception:  # some backends raise instead of returning None
        stats = None
    if stats is None:
        return {"temp": None, "peak": None}
    temp = getattr(stats, "temp_size_in_bytes", None)
    peak = getattr(stats, "peak_memory_in_bytes", None) or None
    if peak is None and temp is not None:
        sizes = [getattr(stats, f"{k}_size_in_bytes", 0) or 0 for k in ("argument", "output")]
        peak = ("≈", sum(sizes) + temp - (getattr(stats, "alias_size_in_bytes", 0) or 0))
    return {"temp": temp, "peak": peak}


def compile_modes(impl, shape, dtype, budget, estimate, row, calls, x=None, ct=None):
    """Compiles ``impl``'s training and fwd+bwd functions for one case into ``row``/``calls``.

    Without ``x`` the functions are lowered for abstract inputs (phase 1); their calls get
    the real inputs later (:func:`bind_inputs`). Returns False when the budget stopped it.
    """
    params, state, static = impl.init(shape, jnp.dtype(dtype), run.MOMENTUM)
    spec = jax.ShapeDtypeStruct(shape, jnp.dtype(dtype))
    x = spec if x is None else x
    ct = spec if ct is None else ct
    fns = run.mode_functions(impl, static)
    for mode in MODES:
        if not budget.allows(estimate(), f"compiling {impl.name} {mode}"):
            return False
        args = (params, state, x, ct)
        compiled, seconds, _ = run.compile_case(fns[mode], args)
        estimate.saw(seconds)
        row["compile"][mode] = seconds
        row["cond"][mode] = conditionals(compiled)
        row["mem"][mode] = memory(compiled)
        calls[(impl.name, mode)] = (compiled, args)
    return True


def bind_inputs(calls, x, ct):
    """``calls`` with abstract ``x`` and cotangent arguments replaced by the real ones."""
    return {k: (fn, (args[0], args[1], x, ct)) for k, (fn, args) in calls.items()}


def time_rounds(calls, rounds, repeats, budget, estimate):
    """Interleaved rounds of ``calls``; ``({key: (median s, median enqueue s)}, rounds)``.

    Each round runs every ``(fn, args)`` ``repeats`` times back to back and blocks once,
    starting one position later in the list than the round before. ``estimate`` is the
    round estimate; before the first round, ``repeats`` times the last warm-up pass.
    """
    keys, call_estimate = list(calls), Estimate()
    for _ in range(WARMUP_CALLS):
        t_pass = time.perf_counter()
        for k in keys:
            if not budget.allows(call_estimate(), f"warming up {k[0]} {k[1]}"):
                return {}, 0
            fn, args = calls[k]
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            call_estimate.saw(time.perf_counter() - t0)
    if keys:
        estimate.saw((time.perf_counter() - t_pass) * repeats)
    samples = {k: [] for k in keys}
    done = 0
    for r in range(rounds):
        if not budget.allows(estimate(), f"round {r + 1}"):
            break
        t_round = time.perf_counter()
        shift = r % len(keys)
        for k in keys[shift:] + keys[:shift]:
            fn, args = calls[k]
            t0 = time.perf_counter()
            for _ in range(repeats):
                out = fn(*args)
            enqueued = time.perf_counter() - t0
            jax.block_until_ready(out)
            samples[k].append(((time.perf_counter() - t0) / repeats, enqueued / repeats))
            del out
        estimate.saw(time.perf_counter() - t_round)
        done += 1
    if not done:
        return {}, 0
    return {k: tuple(np.median(np.array(v), axis=0)) for k, v in samples.items()}, done


def new_row():
    return {"compile": {}, "cond": {}, "mem": {}, "time": {}}


class Run:
    """The state of one run: cases, rows, notes; rendered to Markdown at any point."""

    def __init__(self, args, impls, notes):
        self.args, self.impls, self.notes = args, impls, notes
        self.results = {}  # {(shape, dtype): {"rows": {name: row}, "rounds": n}}
        self.lock = threading.Lock()
        self.written = False
        # Filled in once the watchdog runs (nvidia-smi, run by jax's summary, may hang).
        self.environment = {
            "device": "?",
            "backend": "?",
            "versions": "?",
            "host": "?",
            "info": "(not collected)",
        }

    def write(self, budget, stopped_by=None):
        """Writes and prints the report once; returns its path (None if already written)."""
        if not self.lock.acquire(timeout=10):
            return None
        try:
            if self.written:
                return None
            text = document(self, budget, stopped_by)
            path = Path(self.args.out) / f"RESULTS-gpu-{utc_now():%Y-%m-%d}.md"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            self.written = True
            print(text, flush=True)
            log(f"wrote {path}")
            return path
        finally:
            self.lock.release()


def utc_now():
    return datetime.datetime.now(datetime.timezone.utc)


def environment():
    """Device kind, platform, versions: the lines of the report's header."""
    device = jax.devices()[0]
    names = ("jax", "jaxlib", "numpy", "flax", "equinox", "dm-haiku")
    plugins = ("jax-cuda12-plugin", "jax-cuda12-pjrt", "jax-cuda13-plugin", "jax-cuda13-pjrt")
    names += tuple(p for p in plugins if peers.version(p) != "?")
    versions = ", ".join(f"{p} {peers.version(p)}" for p in names)
    try:  # jax's own summary: versions, devices and, on NVIDIA machines, nvidia-smi
        info = jax.print_environment_info(return_string=True)
    except Exception as e:
        info = f"jax.print_environment_info() failed: {_error(e)}"
    return {
        "device": f"{device.device_kind} ({device.platform}, {jax.device_count()} device(s))",
        "backend": jax.default_backend(),
        "versions": f"bnjax {bnjax.__version__} ({Path(bnjax.__file__).parent}), {versions}",
        "host": f"{report.cpu_model()}, {os.cpu_count()} cores, Python {sys.version.split()[0]}",
        "info": info,
    }


def _fmt_bytes(value):
    if isinstance(value, tuple):
        return f"{value[0]}{report._mib(value[1])}"
    return report._mib(value)


def _pair(row, key, fmt):
    return " / ".join(fmt(row[key].get(m)) for m in MODES)


def case_table(rows, mark_host_bound=True):
    """One case's Markdown table; ``mark_host_bound`` flags times that are mostly dispatch."""
    base = rows.get("bnjax", {}).get("time", {})
    head = ["implementation"]
    for mode in MODES:
        head += [f"{mode} ms", "×bnjax"]
    head += [
        "conditionals (train / fwd+bwd)",
        "temp memory (train / fwd+bwd)",
        "peak memory (train / fwd+bwd)",
        "compile s",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in rows.items():
        if "error" in row:
            lines.append(f"| {name} | {row['error']} |" + " |" * (len(head) - 2))
            continue
        cells = [name]
        for mode in MODES:
            t = row["time"].get(mode)
            ms = report._ms(None if t is None else t[0])
            if mark_host_bound and t is not None and t[1] > 0.8 * t[0]:
                ms += " (host-bound)"
            cells += [ms, report._ratio(None if t is None else t[0], (base.get(mode) or [None])[0])]
        cells += [
            _pair(row, "cond", lambda c: "–" if c is None else str(c)),
            _pair(row, "mem", lambda m: "–" if m is None else _fmt_bytes(m["temp"])),
            _pair(row, "mem", lambda m: "–" if m is None else _fmt_bytes(m["peak"])),
            f"{sum(row['compile'].values()):.2f}" if row["compile"] else "–",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def fastest_peer(rows):
    """Lines: bnjax's time over the fastest peer's, per mode (where both were timed)."""
    ours = rows.get("bnjax", {}).get("time", {})
    out = []
    for mode in MODES:
        timed = {
            n: r["time"][mode][0]
            for n, r in rows.items()
            if n != "bnjax" and mode in r.get("time", {})
        }
        if mode in ours and timed:
            best = min(timed, key=timed.get)
            out.append(
                f"- {mode}: bnjax takes {ours[mode][0] / timed[best]:.2f}× the time of the "
                f"fastest peer ({best}, {timed[best] * 1e3:.3f} ms)"
            )
    return out


def conditional_check(state, backend):
    """The headline check: bnjax's conditionals per case and mode, with a verdict."""
    found = {
        (shape, dtype, mode): res["rows"]["bnjax"]["cond"].get(mode)
        for (shape, dtype), res in state.results.items()
        if "bnjax" in res["rows"]
        for mode in MODES
    }
    counted = {k: v for k, v in found.items() if v is not None}
    total = sum(counted.values())
    if not counted:
        verdict = "NOT MEASURED"
    elif backend == "cpu":
        verdict = f"{total} in all (expected on CPU: `auto` takes the checked path's `lax.switch`)"
    else:
        verdict = "PASS: 0 everywhere" if total == 0 else f"FAIL: {total} conditional(s)"
    missing = len(found) - len(counted)
    line = f"- **bnjax conditionals in the compiled HLO** ({len(counted)} functions): {verdict}"
    return line + (f"; {missing} not compiled (budget)" if missing else "")


def document(state, budget, stopped_by=None):
    env, args = state.environment, state.args
    elapsed = time.perf_counter() - _START
    stop = stopped_by or budget.stopped
    parts = [
        f"# bnjax GPU check ({env['backend']})",
        "",
        f"- date: {utc_now():%Y-%m-%d %H:%M UTC}",
        f"- device: {env['device']}; host: {env['host']}",
        f"- versions: {env['versions']}",
        f"- command: `{' '.join(['python benchmarks/gpu_check.py', *args.argv])}`",
        f"- budget: {args.budget_s:.0f} s; elapsed when written: {elapsed:.1f} s; "
        + (f"**stopped early** ({stop})" if stop else "completed every case"),
        conditional_check(state, env["backend"]),
        "- method: every function compiled with `jax.jit` (`.lower().compile()`), called "
        f"{WARMUP_CALLS} times to warm up, then interleaved rounds in a rotating order; in "
        f"each round a function runs {args.repeats} times back to back and is blocked on "
        "once (time per call). Times are medians over rounds, in ms; ×bnjax is time / "
        'bnjax\'s time in the same mode. bnjax is `BatchNorm(statistics="auto")`; '
        'equinox is `eqx.nn.BatchNorm(mode="batch")` under `jax.vmap(axis_name=...)`. '
        "(host-bound), off CPU: enqueueing the calls took over 80% of their time, so the "
        "figure is dispatch cost, not device time.",
        "- modes: training = forward in training mode (output and new state); fwd+bwd = "
        "that plus the gradients with respect to x, scale and bias for a random cotangent. "
        "Data: normal, mean 1, std 2. conditionals: `conditional(` ops in "
        "`compiled.as_text()`; temp / peak memory: `compiled.memory_analysis()` "
        "(`temp_size_in_bytes`, `peak_memory_in_bytes`; ≈ is arguments + outputs + temp).",
    ]
    parts += [f"- note: {n}" for n in state.notes]
    for (shape, dtype), res in list(state.results.items()):
        rows = res["rows"]
        rounds = res.get("rounds", 0)
        timing = f"{rounds} round(s)" if rounds else "not timed"
        table = case_table(rows, mark_host_bound=env["backend"] != "cpu")
        parts += ["", f"## {shape} {dtype} ({timing})", "", table]
        summary = fastest_peer(rows)
        if summary:
            parts += [""] + summary
    parts += ["", "<details><summary>jax.print_environment_info()</summary>", ""]
    parts += ["~~~", env["info"].strip(), "~~~", "", "</details>"]
    return "\n".join(parts) + "\n"


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(BENCH), help="directory of the report")
    parser.add_argument("--budget-s", type=float, default=300.0, help="seconds from start")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, 2 rounds (CPU test)")
    parser.add_argument("--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES))
    parser.add_argument("--shapes", nargs="+", help="shapes like 4096,1024 (features last)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 21; smoke 2)")
    parser.add_argument("--repeats", type=int, help="calls per round (default 10; smoke 2)")
    parser.add_argument("--peers", nargs="*", help=f"only these of {list(PEER_FACTORIES)}")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.shapes:
        args.shapes = [tuple(int(d) for d in s.split(",")) for s in args.shapes]
    else:
        args.shapes = list(SMOKE_SHAPES if args.smoke else SHAPES)
    args.rounds = args.rounds or (2 if args.smoke else 21)
    args.repeats = args.repeats or (2 if args.smoke else 10)
    if args.rounds < 1 or args.repeats < 1 or args.budget_s <= 0:
        parser.error("--rounds, --repeats and --budget-s must be positive")
    return args


def build_impls(names):
    """bnjax (auto) and the peers that build; notes for those left out."""
    impls, notes = [peers._bnjax()], []
    for name, factory in PEER_FACTORIES.items():
        if names is not None and name not in names:
            continue
        try:
            impls.append(factory())
        except Exception as e:  # ImportError, or a library that breaks on this jax
            notes.append(f"{name} left out: {type(e).__name__}: {e}")
    return impls, notes


def _error(e):
    """One line for a table cell or a note."""
    text = f"{type(e).__name__}: {e}".splitlines()[0]
    return text if len(text) <= 160 else text[:157] + "..."


def phase1(state, budget, estimate, cases):
    """bnjax's functions for every case, compiled for abstract inputs: their conditionals
    and memory, before any timing; returns ``{case: calls}``."""
    bn, calls = state.impls[0], {}
    for case in cases:  # every case is listed in the report, reached or not
        state.results[case] = {"rows": {"bnjax": new_row()}}
        calls[case] = {}
    for shape, dtype in cases:
        row = state.results[(shape, dtype)]["rows"]["bnjax"]
        log(f"phase 1: compiling bnjax for {shape} {dtype}")
        try:
            if not compile_modes(bn, shape, dtype, budget, estimate, row, calls[(shape, dtype)]):
                break
        except Exception as e:
            row["error"] = f"failed: {_error(e)}"
            log(f"  bnjax failed: {row['error']}")
    return calls


def phase2(state, budget, estimates, case, bnjax_calls):
    """One case: the peers compiled on the real inputs, then every compiled function timed."""
    (shape, dtype), args = case, state.args
    res = state.results[case]
    log(f"phase 2: {shape} {dtype}")
    x, ct = run.case_inputs(run.Case(shape, dtype))
    calls = bind_inputs(bnjax_calls, x, ct)
    for impl in state.impls[1:]:
        row = res["rows"].setdefault(impl.name, new_row())
        mine = {}
        try:
            ok = compile_modes(impl, shape, dtype, budget, estimates[0], row, mine, x, ct)
        except Exception as e:  # a peer that cannot run this case is reported, not fatal
            row["error"] = f"failed: {_error(e)}"
            log(f"  {impl.name} failed: {row['error']}")
            continue
        calls.update(mine)
        if not ok:
            break
        log(f"  compiled {impl.name} ({sum(row['compile'].values()):.1f} s)")
    res["rounds"] = 0
    try:
        times, res["rounds"] = time_rounds(calls, args.rounds, args.repeats, budget, estimates[1])
    except Exception as e:  # e.g. out of device memory: the compiled figures still count
        state.notes.append(f"timing {shape} {dtype} failed: {_error(e)}")
        log(f"  timing failed: {_error(e)}")
        return
    for (name, mode), t in times.items():
        res["rows"][name]["time"][mode] = t
    log(f"  timed {res['rounds']} round(s)")


def main(argv=None):
    """Runs the check and writes the report, whatever stops it; returns the :class:`Run`."""
    args = parse_args(argv)
    # Most of the reserve is for the report; it grows with the budget, up to 10 s.
    budget = Budget(args.budget_s, reserve=min(10.0, 1.0 + 0.03 * args.budget_s))
    impls, notes = build_impls(args.peers)
    state = Run(args, impls, notes)

    # The watchdog: a compile or call that overruns the budget cannot be interrupted, but
    # the report can still be written from this thread (XLA releases the GIL meanwhile).
    def watchdog():
        log("watchdog: the budget is spent inside one compile or call; writing and exiting")
        try:
            state.write(budget, stopped_by="watchdog: a compile or call overran the budget")
        finally:
            os._exit(3)

    # Never sooner than 5 s from now: a budget spent on imports stops at the first check.
    grace = min(30.0, 0.1 * args.budget_s)
    timer = threading.Timer(
        max(5.0, _START + args.budget_s + grace - time.perf_counter()), watchdog
    )
    timer.daemon = True
    timer.start()
    try:
        state.environment = environment()
        log(f"{state.environment['device']}; measuring {[i.name for i in impls]}")
        cases = [(tuple(s), d) for s in args.shapes for d in args.dtypes]
        estimates = (Estimate(), Estimate())  # compiles, rounds
        calls = phase1(state, budget, estimates[0], cases)
        for case in cases:
            if budget.stopped:
                break
            phase2(state, budget, estimates, case, calls.pop(case))
    except BaseException as e:  # written down, then raised (KeyboardInterrupt included)
        state.notes.append(f"stopped by an error: {_error(e)}")
        raise
    finally:
        timer.cancel()
        state.write(budget)
    return state


if __name__ == "__main__":
    main()
