"""Data-parallel training over 8 forced CPU devices, checked against one device.

The same digits CNN is trained three ways on the same global batches:

1. one device, the whole batch (the reference);
2. ``jax.shard_map`` over a ``("data",)`` mesh: each device holds a slice of the batch,
   BatchNorm is built with ``axis_name="data"`` so its statistics are those of the
   global batch, and the train step averages the loss over the axis before
   differentiating (``make_train_step(..., axis_name="data")``);
3. plain ``jax.jit`` over a batch sharded across the devices, no ``axis_name``: XLA
   partitions the computation and inserts the collectives itself.

All three must end with the same parameters, optimizer state and BatchNorm state. When
run as a script, the example forces the CPU devices itself (``XLA_FLAGS``) before JAX is
imported; the same code runs unchanged on several GPUs or TPU cores.

Run: ``python examples/data_parallel.py [--config configs/data_parallel.toml] [key=value ...]``
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # must precede the first import of jax
    # 8 CPU devices; and on a busy machine with fewer cores than devices, let a device
    # thread that waits for the others in a collective wait longer than XLA's default 40 s.
    for _flag in (
        "--xla_force_host_platform_device_count=8",
        "--xla_cpu_collective_call_terminate_timeout_seconds=600",
    ):
        if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
            os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_flag}".strip()
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import dataclasses  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from _config import config_from_argv  # noqa: E402
from _digits import CNN, cross_entropy, load_split, loss_and_accuracy  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from bnjax import training  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = ROOT / "configs" / "data_parallel.toml"


@dataclasses.dataclass(frozen=True)
class Config:
    """Settings of the data-parallel example (see ``configs/data_parallel.toml``)."""

    seed: int = 0
    devices: int = 8
    epochs: int = 3
    batch_size: int = 64
    learning_rate: float = 0.05
    momentum: float = 0.9
    bn_momentum: float = 0.9
    channels: tuple[int, int] = (16, 32)
    test_fraction: float = 0.2
    tolerance: float = 1e-4

    def __post_init__(self):
        if self.devices < 1 or self.batch_size % self.devices:
            raise ValueError(
                f"batch_size={self.batch_size} must be a multiple of devices={self.devices}"
            )


def global_batches(cfg: Config, x, y):
    """The shuffled global batches of every epoch, as numpy arrays."""
    rng = np.random.default_rng(cfg.seed)
    n = len(x) - len(x) % cfg.batch_size
    for _ in range(cfg.epochs):
        for idx in rng.permutation(len(x))[:n].reshape(-1, cfg.batch_size):
            yield {"x": x[idx], "y": y[idx]}


def make_runs(cfg: Config, mesh):
    """The three ways to run one step: ``name -> (step, place_state, place_batch)``."""
    optimizer = optax.sgd(cfg.learning_rate, momentum=cfg.momentum, nesterov=True)
    plain = CNN(channels=cfg.channels, bn_momentum=cfg.bn_momentum)
    synced = dataclasses.replace(plain, axis_name="data")
    step = training.make_train_step(plain.apply, cross_entropy, optimizer)
    dp_step = training.make_train_step(synced.apply, cross_entropy, optimizer, axis_name="data")
    specs = dict(mesh=mesh, in_specs=(P(), P("data")), out_specs=(P(), P()))
    replicated = lambda t: jax.device_put(t, NamedSharding(mesh, P()))  # noqa: E731
    split = lambda t: jax.device_put(t, NamedSharding(mesh, P("data")))  # noqa: E731
    one = lambda t: jax.device_put(t, jax.devices()[0])  # noqa: E731
    runs = {
        "one device": (jax.jit(step, donate_argnums=0), one, one),
        "shard_map": (
            jax.jit(jax.shard_map(dp_step, **specs), donate_argnums=0),
            replicated,
            split,
        ),
        "jit, sharded batch": (jax.jit(step, donate_argnums=0), replicated, split),
    }
    return optimizer, plain, runs


def train_all(cfg: Config, mesh, x, y):
    """Trains the model each way from the same initial state; returns states and timings."""
    optimizer, model, runs = make_runs(cfg, mesh)
    results = {}
    for name, (step, place_state, place_batch) in runs.items():
        state = place_state(
            training.TrainState.create(*model.init(jax.random.key(cfg.seed)), optimizer)
        )
        start = time.perf_counter()
        for batch in global_batches(cfg, x, y):
            state, metrics = step(state, place_batch(batch))
        jax.block_until_ready(state)
        results[name] = (state, float(metrics["loss"]), time.perf_counter() - start)
    return model, results


def max_difference(a, b) -> float:
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    return max(float(np.max(np.abs(np.asarray(u) - np.asarray(v)))) for u, v in pairs)


def main(argv=None) -> dict:
    cfg = config_from_argv(Config, DEFAULT_CONFIG, argv)
    if jax.device_count() < cfg.devices:
        raise ValueError(
            f"devices={cfg.devices} but JAX sees {jax.device_count()}; run this file as a "
            "script, or set XLA_FLAGS=--xla_force_host_platform_device_count=8 before JAX starts"
        )
    mesh = jax.make_mesh((cfg.devices,), ("data",))
    x_tr, y_tr, x_te, y_te = load_split(cfg.test_fraction, cfg.seed)
    model, results = train_all(cfg, mesh, x_tr, y_tr)
    evaluate = jax.jit(training.make_eval_step(model.apply, loss_and_accuracy))
    test = {"x": jnp.asarray(x_te), "y": jnp.asarray(y_te)}
    reference = results["one device"][0]
    diffs, accs = {}, {}
    print(f"{cfg.devices} devices, global batch {cfg.batch_size}, {cfg.epochs} epochs")
    for name, (state, loss, seconds) in results.items():
        state = jax.device_put(state, jax.devices()[0])
        diffs[name] = max_difference(state, reference)
        accs[name] = float(evaluate(state, test)["accuracy"])
        print(
            f"  {name:<20} {seconds:5.1f} s  last loss {loss:.4f}  test accuracy "
            f"{accs[name]:.4f}  max |state - one device| {diffs[name]:.1e}"
        )
    ok = max(diffs.values()) <= cfg.tolerance
    print("data-parallel training equals one device" if ok else "MISMATCH")
    counts = int(results["shard_map"][0].bn_state["bn1"].count)
    return {"ok": ok, "max_diff": diffs, "test_accuracy": accs, "bn_count": counts}


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
