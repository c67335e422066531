"""Train an ensemble of digit classifiers in one call with ``jax.vmap``.

Every member has its own initialization, its own data order, its own parameters,
optimizer state and BatchNorm running statistics: the ensemble is a ``TrainState`` whose
leaves carry a leading member axis, and ``jax.vmap(train_step)`` trains all members at
once. At every step the script also runs the plain step on each member alone, from the
same state, and checks that the two agree; it then trains each member alone from start
to end and reports how far the two runs drift apart (float32 sums are ordered
differently inside the batched convolutions, and hundreds of SGD steps can amplify a
rounding difference). Every member and the averaged ensemble are evaluated in
inference mode.

Run: ``python examples/ensemble_vmap.py [--config configs/ensemble_vmap.toml] [key=value ...]``
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from _config import config_from_argv  # noqa: E402
from _digits import CNN, accuracy, cross_entropy, load_split  # noqa: E402

from bnjax import training  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = ROOT / "configs" / "ensemble_vmap.toml"


@dataclasses.dataclass(frozen=True)
class Config:
    """Settings of the ensemble example (see ``configs/ensemble_vmap.toml``)."""

    seed: int = 0
    members: int = 4
    epochs: int = 4
    batch_size: int = 32
    learning_rate: float = 0.05
    momentum: float = 0.9
    bn_momentum: float = 0.9
    channels: tuple[int, int] = (16, 32)
    test_fraction: float = 0.2
    tolerance: float = 1e-4

    def __post_init__(self):
        if self.members < 1:
            raise ValueError(f"members must be at least 1; got {self.members}")


def member_batches(cfg: Config, x, y):
    """Per step, a batch for every member: x (members, batch, 8, 8, 1), y (members, batch)."""
    steps_per_epoch = len(x) // cfg.batch_size
    rngs = [np.random.default_rng(cfg.seed + 1 + m) for m in range(cfg.members)]
    batches = []
    for _ in range(cfg.epochs):
        orders = [r.permutation(len(x))[: steps_per_epoch * cfg.batch_size] for r in rngs]
        for s in range(steps_per_epoch):
            idx = np.stack([o[s * cfg.batch_size : (s + 1) * cfg.batch_size] for o in orders])
            batches.append({"x": x[idx], "y": y[idx]})
    return batches


def _member(tree, m: int):
    return jax.tree.map(lambda a: np.asarray(a)[m], tree)


def _max_diff(a, b) -> float:
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    return max(float(np.max(np.abs(np.asarray(u) - np.asarray(v)))) for u, v in pairs)


def train_ensemble(vstep, solo_step, ensemble, batches, members: int):
    """Trains with ``jax.vmap(step)``; at every step, also runs ``step`` on each member alone
    from the same state and records the largest difference. Returns the ensemble, the
    seconds spent in the vmapped step, and that largest one-step difference."""
    seconds, worst = 0.0, 0.0
    for batch in batches:
        start = time.perf_counter()
        new = jax.block_until_ready(vstep(ensemble, batch)[0])
        seconds += time.perf_counter() - start
        for m in range(members):
            alone, _ = solo_step(_member(ensemble, m), _member(batch, m))
            worst = max(worst, _max_diff(_member(new, m), alone))
        ensemble = new
    return ensemble, seconds, worst


def train_alone(solo_step, create, keys, batches):
    """Trains every member on its own from start to end; returns the states and seconds."""
    start = time.perf_counter()
    solos = []
    for m, key in enumerate(keys):
        state = create(key)
        for batch in batches:
            state, _ = solo_step(state, _member(batch, m))
        solos.append(state)
    jax.block_until_ready(solos)
    return solos, time.perf_counter() - start


def train_both_ways(cfg: Config, model: CNN, batches):
    """The vmapped ensemble (checked step by step) and the members trained alone."""
    optimizer = optax.sgd(cfg.learning_rate, momentum=cfg.momentum, nesterov=True)
    step = training.make_train_step(model.apply, cross_entropy, optimizer)
    create = lambda key: training.TrainState.create(*model.init(key), optimizer)  # noqa: E731
    keys = [jax.random.fold_in(jax.random.key(cfg.seed), m) for m in range(cfg.members)]
    ensemble = jax.vmap(create)(jnp.stack(keys))
    vstep, solo_step = jax.jit(jax.vmap(step)), jax.jit(step)
    ensemble, vmap_s, step_diff = train_ensemble(vstep, solo_step, ensemble, batches, cfg.members)
    solos, solo_s = train_alone(solo_step, create, keys, batches)
    return {
        "ensemble": ensemble,
        "solos": solos,
        "vmap_seconds": vmap_s,
        "solo_seconds": solo_s,
        "step_diff": step_diff,
    }


@functools.partial(jax.jit, static_argnums=0)
def evaluate(model: CNN, ensemble, test):
    """Test accuracy of every member, shape (members,), and of the averaged probabilities."""

    def logits(state):
        return model.apply(state.params, state.bn_state, test["x"], training=False)[0]

    all_logits = jax.vmap(logits)(ensemble)
    members = jax.vmap(accuracy, in_axes=(0, None))(all_logits, test)
    return members, accuracy(jnp.mean(jax.nn.softmax(all_logits), axis=0), test)


def main(argv=None) -> dict:
    cfg = config_from_argv(Config, DEFAULT_CONFIG, argv)
    x_tr, y_tr, x_te, y_te = load_split(cfg.test_fraction, cfg.seed)
    model = CNN(channels=cfg.channels, bn_momentum=cfg.bn_momentum)
    batches = member_batches(cfg, x_tr, y_tr)
    run = train_both_ways(cfg, model, batches)
    ensemble, test = run["ensemble"], {"x": x_te, "y": y_te}
    drift = [_max_diff(_member(ensemble, m), s) for m, s in enumerate(run["solos"])]
    members_acc, ensemble_acc = evaluate(model, ensemble, test)
    solo_acc, _ = evaluate(model, jax.tree.map(lambda *a: np.stack(a), *run["solos"]), test)
    members_acc, solo_acc = members_acc.tolist(), solo_acc.tolist()
    ensemble_acc = float(ensemble_acc)
    print(f"{cfg.members} members, {len(batches)} steps each, BatchNorm state per member")
    seconds = f"{run['vmap_seconds']:.1f} s with jax.vmap, {run['solo_seconds']:.1f} s one by one"
    print(f"  training time: {seconds}")
    print(f"  BatchNorm updates per member: {np.asarray(ensemble.bn_state['bn1'].count)}")
    print(f"  every step, max |vmap - alone| from the same state: {run['step_diff']:.1e}")
    for m, (acc, solo, d) in enumerate(zip(members_acc, solo_acc, drift, strict=True)):
        print(
            f"  member {m}: test accuracy {acc:.4f} (trained alone: {solo:.4f}); "
            f"after all steps max |vmap - alone| {d:.1e}"
        )
    print(f"  averaged ensemble: test accuracy {ensemble_acc:.4f}")
    ok = run["step_diff"] <= cfg.tolerance
    print("vmap(train_step) equals train_step on every member" if ok else "MISMATCH")
    return {
        "ok": ok,
        "step_diff": run["step_diff"],
        "drift": drift,
        "member_accuracy": members_acc,
        "solo_accuracy": solo_acc,
        "ensemble_accuracy": ensemble_acc,
        "vmap_seconds": run["vmap_seconds"],
        "solo_seconds": run["solo_seconds"],
        "counts": np.asarray(ensemble.bn_state["bn1"].count).tolist(),
        "steps": len(batches),
    }


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
