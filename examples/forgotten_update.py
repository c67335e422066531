"""The forgotten BatchNorm update, three ways, and ``bnjax.testing`` naming each one.

Batch normalization's best-known bug is a running average that never updates: TF1's
moving averages only moved if the ops in ``UPDATE_OPS`` were run, and inference then
used the statistics of ``init``. With bnjax the new state comes back from every call,
but a train step can still lose it. This script trains the digits CNN with three broken
train steps and the fixed one:

1. ``dropped``: the loss function throws the new state away (``logits, _ = ...``) and
   the step returns only the parameters;
2. ``stale``: the step returns the state it was given instead of the new one;
3. ``stuck``: the model runs with ``training=False`` in the train step.

For each, ``bnjax.testing.audit`` (tracing only, nothing runs) and
``bnjax.testing.check_train_step`` (one jitted run) name the problem; then every step
trains the same model from the same start, and the test loss in inference mode shows
what the bug costs: the training loss looks fine, the test loss does not.

Run: ``python examples/forgotten_update.py [--config FILE.toml] [key=value ...]``
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from _config import config_from_argv  # noqa: E402
from _digits import CNN, cross_entropy, load_split  # noqa: E402

import bnjax.testing  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = ROOT / "configs" / "forgotten_update.toml"


@dataclasses.dataclass(frozen=True)
class Config:
    """Settings of the forgotten-update example (see ``configs/forgotten_update.toml``)."""

    seed: int = 0
    steps: int = 200
    batch_size: int = 64
    learning_rate: float = 0.05
    bn_momentum: float = 0.9
    channels: tuple[int, int] = (8, 16)
    test_fraction: float = 0.2


def make_steps(model: CNN, optimizer):
    """The three broken train steps and the fixed one, ``step(params, opt, bn, batch)``."""

    def loss_fn(params, bn_state, batch, training=True):
        logits, new_bn_state = model.apply(params, bn_state, batch["x"], training=training)
        return cross_entropy(logits, batch), new_bn_state

    def update(params, opt_state, grads):
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    def dropped(params, opt_state, bn_state, batch):
        def loss(p):
            logits, _ = model.apply(p, bn_state, batch["x"], training=True)  # state dropped
            return cross_entropy(logits, batch)

        grads = jax.grad(loss)(params)
        return update(params, opt_state, grads)  # and bn_state is not returned

    def stale(params, opt_state, bn_state, batch):
        grads, _ = jax.grad(loss_fn, has_aux=True)(params, bn_state, batch)
        return (*update(params, opt_state, grads), bn_state)  # the state it was given

    def stuck(params, opt_state, bn_state, batch):
        grads, new = jax.grad(loss_fn, has_aux=True)(params, bn_state, batch, False)
        return (*update(params, opt_state, grads), new)  # training flag stuck at False

    def fixed(params, opt_state, bn_state, batch):
        grads, new = jax.grad(loss_fn, has_aux=True)(params, bn_state, batch)
        return (*update(params, opt_state, grads), new)

    return {"dropped": dropped, "stale": stale, "stuck": stuck, "fixed": fixed}


def train(cfg: Config, model: CNN, optimizer, step, data):
    """Trains from the same start; returns the last training loss and the final state.

    A step that does not return a BatchNorm state leaves the caller's unchanged, as a
    training loop written around it would.
    """
    x, y = data
    params, bn_state = model.init(jax.random.key(cfg.seed))
    opt_state = optimizer.init(params)
    rng = np.random.default_rng(cfg.seed)
    jitted = jax.jit(step)

    def objective(params, bn_state, batch):
        return cross_entropy(model.apply(params, bn_state, batch["x"], training=True)[0], batch)

    for _ in range(cfg.steps):
        idx = rng.choice(len(x), cfg.batch_size, replace=False)
        batch = {"x": x[idx], "y": y[idx]}
        out = jitted(params, opt_state, bn_state, batch)
        params, opt_state = out[0], out[1]
        bn_state = out[2] if len(out) == 3 else bn_state
    return float(objective(params, bn_state, batch)), params, bn_state


def main(argv=None) -> dict:
    cfg = config_from_argv(Config, DEFAULT_CONFIG, argv)
    x_tr, y_tr, x_te, y_te = load_split(cfg.test_fraction, cfg.seed)
    model = CNN(channels=cfg.channels, bn_momentum=cfg.bn_momentum)
    optimizer = optax.sgd(cfg.learning_rate, momentum=0.9)
    params, bn_state = model.init(jax.random.key(cfg.seed))
    opt_state = optimizer.init(params)
    batch = {"x": x_tr[: cfg.batch_size], "y": y_tr[: cfg.batch_size]}
    results = {}
    for name, step in make_steps(model, optimizer).items():
        found = bnjax.testing.audit(step, params, opt_state, bn_state, batch, expect="train")
        try:
            bnjax.testing.check_train_step(step, params, opt_state, bn_state, batch)
            checked = "passes"
        except AssertionError as e:
            checked = str(e).splitlines()[1].strip()
        train_loss, p, s = train(cfg, model, optimizer, step, (x_tr, y_tr))
        logits = model.apply(p, s, x_te, training=False)[0]
        test_loss = float(cross_entropy(logits, {"y": y_te}))
        print(f"{name}: training loss {train_loss:.3f}, test loss (inference) {test_loss:.3f}")
        for f in found or ["audit: no finding"]:
            print(f"  {f}"[:160])
        print(f"  check_train_step: {checked}"[:160])
        results[name] = {
            "kinds": [f.kind for f in found],
            "where": [f.where for f in found],
            "check": checked,
            "train_loss": train_loss,
            "test_loss": test_loss,
        }
    return results


if __name__ == "__main__":
    main()
