"""Multi-host batch norm: N processes on 127.0.0.1 give the statistics of one process.

The script launches ``--processes N`` copies of itself as workers. Each worker forces
``devices_per_process`` CPU devices, turns on gloo collectives and joins JAX's
multi-controller runtime (``jax.distributed``). Together they hold one global batch,
sharded row-wise over every device of every process, with uneven masks (a full shard,
a shard with one counted row, a fully masked shard, ...). They compute:

* batch-norm statistics with ``axis_name`` under ``jax.shard_map`` over the global mesh;
* the same with plain ``jax.jit`` over the globally sharded batch (no ``axis_name``);
* a few data-parallel SGD steps of a dense layer followed by BatchNorm, both ways.

The launcher computes the same things in one process on the full batch and compares.
Exit code 0 only if everything matches. Every worker runs under a deadline and is
killed, with its process group, on every path out of the launcher.

Run: ``python examples/multihost.py --processes 2 [--config PATH] [key=value ...]``
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import bnjax
from bnjax.training import TrainState

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _multihost_model as model  # noqa: E402  (the examples' helpers, next to this file)
import _processes as processes  # noqa: E402
from _config import load_config  # noqa: E402
from _multihost_model import Config  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = ROOT / "configs" / "multihost.toml"
AXIS = "data"


# -- the single-process reference ---------------------------------------------------


def _results(stats, trained, flavors) -> dict[str, np.ndarray]:
    out = {}
    for flavor in flavors:
        out.update({f"stats.{flavor}.{k}": np.asarray(v) for k, v in stats[flavor].items()})
        out.update({f"train.{flavor}.{k}": np.asarray(v) for k, v in trained[flavor].items()})
    return out


def reference(cfg: Config) -> dict[str, np.ndarray]:
    """Everything the workers compute, computed here in one process on the full batch."""
    problem = model.make_problem(cfg)
    bn = bnjax.BatchNorm(momentum=0.9)
    batch = model.make_batch(problem)
    x, mask = batch["x"]["x"], batch["x"]["mask"]
    apply = jax.jit(functools.partial(model.bn_apply, bn))
    stats = model.statistics(apply, *bn.init(x), x, mask)
    params, bn_state = model.init_model(cfg, problem, bn)
    state = TrainState.create(params, bn_state, optax.sgd(cfg.learning_rate))
    trained = model.train(cfg, bn, state, batch)
    flavors = ("shard_map", "jit")
    return _results(dict.fromkeys(flavors, stats), dict.fromkeys(flavors, trained), flavors)


# -- a worker: one process of the multi-controller run ------------------------------


def _global(mesh, host, spec):
    """A global array from its full host copy; each process fills only its own shards."""
    host = np.asarray(host)
    sharding = NamedSharding(mesh, spec)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def _to_host(a) -> np.ndarray:
    """The full value of a global array, gathered from every process."""
    if a.is_fully_replicated:
        return np.asarray(a.addressable_data(0))
    return np.asarray(multihost_utils.process_allgather(a, tiled=True))


def distributed_results(cfg: Config, mesh) -> dict[str, np.ndarray]:
    """Statistics and training over the global mesh, gathered to every process."""
    problem = model.make_problem(cfg)
    batch = model.make_batch(problem, functools.partial(_global, mesh, spec=P(AXIS)))
    x, mask = batch["x"]["x"], batch["x"]["mask"]
    replicated = functools.partial(jax.tree.map, lambda a: _global(mesh, a, P()))
    bn = bnjax.BatchNorm(momentum=0.9)
    synced = dataclasses.replace(bn, axis_name=AXIS)
    specs = (P(), P(), P(AXIS), P(AXIS))
    apply_sm = jax.shard_map(
        functools.partial(model.bn_apply, synced),
        mesh=mesh,
        in_specs=specs,
        out_specs=(P(AXIS), P()),
    )
    stats = {
        flavor: model.statistics(jax.jit(apply), *replicated(bn.init(problem["x"])), x, mask)
        for flavor, apply in (
            ("shard_map", apply_sm),
            ("jit", functools.partial(model.bn_apply, bn)),
        )
    }
    params, bn_state = model.init_model(cfg, problem, bn)
    state = replicated(TrainState.create(params, bn_state, optax.sgd(cfg.learning_rate)))
    wrap = functools.partial(
        jax.shard_map, mesh=mesh, in_specs=(P(), P(AXIS)), out_specs=(P(), P())
    )
    trained = {
        "shard_map": model.train(cfg, synced, state, batch, wrap),
        "jit": model.train(cfg, bn, state, batch),
    }
    gathered = jax.tree.map(_to_host, (stats, trained))
    return _results(*gathered, ("shard_map", "jit"))


def worker(cfg: Config, rank: int, port: int, out_dir: Path, stall: int | None) -> None:
    """One process: joins the distributed runtime, computes, writes ``rank{rank}.npz``."""
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={cfg.devices_per_process}"
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=cfg.processes,
        process_id=rank,
        initialization_timeout=max(1, int(cfg.timeout)),
    )
    if rank == stall:  # exercises the launcher's timeout path: the others wait on us
        time.sleep(10 * cfg.timeout)
    mesh = jax.make_mesh((jax.device_count(),), (AXIS,), axis_types=(AxisType.Explicit,))
    results = distributed_results(cfg, mesh)
    np.savez(out_dir / f"rank{rank}.npz", **results)
    jax.distributed.shutdown()


# -- the launcher -------------------------------------------------------------------


def _spawn(cfg: Config, rank: int, port: int, out_dir: Path, stall) -> subprocess.Popen:
    """Starts worker ``rank`` in its own process group, its output in ``rank{rank}.log``."""
    flags = f"--xla_force_host_platform_device_count={cfg.devices_per_process}"
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(rank)]
    cmd += ["--port", str(port), "--out", str(out_dir), "--parent", str(os.getpid())]
    if stall is not None:
        cmd += ["--stall", str(stall)]
    return processes.spawn(cmd, env, out_dir / f"rank{rank}.log")


def compare(expected: dict, got: dict, cfg: Config) -> tuple[dict[str, float], list[str]]:
    """Largest difference per result, and the results outside the tolerance.

    The difference is ``|got - expected| / max(1, |expected|)``: absolute for values of
    order one or less, relative for larger ones.
    """
    errors, mismatches = {}, []
    for key, ref in expected.items():
        value = got.get(key)
        if value is None or value.shape != ref.shape:
            mismatches.append(f"{key}: missing or of shape {getattr(value, 'shape', None)}")
            continue
        ref64 = ref.astype(np.float64)
        diff = np.abs(value.astype(np.float64) - ref64)
        errors[key] = float((diff / np.maximum(1.0, np.abs(ref64))).max(initial=0.0))
        if not np.all(diff <= cfg.atol + cfg.rtol * np.abs(ref64)):
            mismatches.append(f"{key} differs from one process by up to {errors[key]:.3g}")
    return errors, mismatches


def _collect(cfg: Config, out_dir: Path, expected: dict) -> tuple[dict, list[str]]:
    """Compares every worker's ``rank{r}.npz`` with the reference."""
    errors, mismatches = {}, []
    for rank in range(cfg.processes):
        with np.load(out_dir / f"rank{rank}.npz") as got:
            found, wrong = compare(expected, dict(got), cfg)
        errors.update({f"rank{rank}.{k}": e for k, e in found.items()})
        mismatches += [f"rank{rank}.{m}" for m in wrong]
    return errors, mismatches


def launch(cfg: Config, *, stall: int | None = None) -> dict:
    """Runs the workers and compares them with one process on the full batch.

    Args:
      cfg: the settings.
      stall: a worker rank that hangs after joining (tests the timeout path), or None.

    Returns:
      ``{"ok", "pids", "seconds", "errors" or "failure"}``; ``errors`` maps every result
      of every worker to its largest absolute difference from the reference.
    """
    start, procs = time.monotonic(), []
    with tempfile.TemporaryDirectory(prefix="bnjax-multihost-") as tmp:
        out_dir = Path(tmp)
        (out_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg)))
        port = processes.free_port()
        try:
            procs = [_spawn(cfg, r, port, out_dir, stall) for r in range(cfg.processes)]
            print(f"workers (pids): {' '.join(str(p.pid) for p in procs)}", flush=True)
            # Watched from the start: the launcher's deadline always comes before anything
            # a worker times itself (its watchdog, jax.distributed's timeouts).
            failure = processes.wait_all(procs, start + cfg.timeout)
        finally:
            processes.kill_all(procs)
        pids = [p.pid for p in procs]
        seconds = time.monotonic() - start
        if failure is not None:
            logs = [
                (out_dir / f"rank{r}.log").read_text(errors="replace") for r in range(len(procs))
            ]
            tails = "".join(f"\n--- worker {r} ---\n{t[-2000:]}" for r, t in enumerate(logs))
            return {"ok": False, "failure": failure + tails, "pids": pids, "seconds": seconds}
        errors, mismatches = _collect(cfg, out_dir, reference(cfg))
    seconds = time.monotonic() - start
    result = {"ok": not mismatches, "errors": errors, "pids": pids, "seconds": seconds}
    if mismatches:
        result["failure"] = "results differ from one process:\n" + "\n".join(mismatches)
    return result


def load(args) -> Config:
    """Reads the config file, then applies ``key=value`` and ``--processes/--timeout``."""
    overrides = list(args.overrides)
    overrides += [
        f"{k}={v}" for k in ("processes", "timeout") if (v := getattr(args, k)) is not None
    ]
    return load_config(Config, args.config, overrides)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, help="number of worker processes")
    parser.add_argument("--timeout", type=float, help="seconds before every worker is killed")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="TOML settings")
    parser.add_argument("--stall", type=int, help="rank of a worker that hangs (tests timeouts)")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--parent", type=int, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    return parser


def main(argv=None) -> dict:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.worker is not None:
        out_dir = Path(args.out)
        cfg = Config(**json.loads((out_dir / "config.json").read_text()))
        # A backstop for a launcher that is alive but stuck: well after the launcher's own
        # deadline (start + timeout), at which it kills every worker itself.
        processes.watch_parent(args.parent, 2 * cfg.timeout + 30)
        worker(cfg, args.worker, args.port, out_dir, args.stall)
        return {"ok": True}
    cfg = load(args)
    print(f"{cfg.processes} processes x {cfg.devices_per_process} CPU devices on 127.0.0.1")
    result = launch(cfg, stall=args.stall)
    if not result["ok"]:
        print(f"FAILED: {result['failure']}")
        return result
    print(f"{len(result['errors'])} results equal one process on the full batch")
    for group in ("stats.shard_map", "stats.jit", "train.shard_map", "train.jit"):
        worst = max(e for k, e in result["errors"].items() if k.split(".", 1)[1].startswith(group))
        print(f"  {group:<16} largest difference {worst:.1e}")
    print(f"wall time: {result['seconds']:.1f} s")
    return result


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the cleanup on SIGTERM
    sys.exit(0 if main()["ok"] else 1)
