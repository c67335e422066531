"""Train an Equinox CNN with ``bnjax.equinox.BatchNorm`` on the scikit-learn digits.

The model is plain Equinox: ``eqx.nn.Conv2d``, ``eqx.nn.MaxPool2d``, ``eqx.nn.Linear``,
and bnjax's drop-in for ``eqx.nn.BatchNorm``, made with ``eqx.nn.make_with_state``. Each
example goes through the model on its own; ``eqx.filter_vmap(..., axis_name="batch")``
maps it over the batch, and the BatchNorm layers combine their statistics across that
axis. The running statistics travel in the ``eqx.nn.State``, returned by every train
step. Before training, ``bnjax.testing.audit`` traces the step and confirms that no
update is lost; after each epoch the test set is evaluated in inference mode
(``eqx.nn.inference_mode``: running statistics).

Run: ``python examples/equinox_cnn.py [--config configs/equinox_cnn.toml] [key=value ...]``
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from _config import config_from_argv  # noqa: E402
from _digits import CLASSES, load_split  # noqa: E402

import bnjax.equinox  # noqa: E402
import bnjax.testing  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = ROOT / "configs" / "equinox_cnn.toml"
AXIS = "batch"


@dataclasses.dataclass(frozen=True)
class Config:
    """Settings of the Equinox example (see ``configs/equinox_cnn.toml``)."""

    seed: int = 0
    epochs: int = 12
    batch_size: int = 32
    learning_rate: float = 0.05
    momentum: float = 0.9
    bn_momentum: float = 0.9
    mode: str = "batch"
    channels: tuple[int, int] = (32, 64)
    test_fraction: float = 0.2
    progress: bool = True

    def __post_init__(self):
        if self.mode not in ("batch", "ema"):
            raise ValueError(f"mode must be 'batch' or 'ema'; got {self.mode!r}")


class CNN(eqx.Module):
    """Two 3x3 convolutions, each followed by BatchNorm and ReLU, then a linear classifier.

    One example of shape (1, 8, 8) (channels first, as Equinox's layers expect) gives
    logits of shape (10,).
    """

    features: eqx.nn.Sequential
    head: eqx.nn.Linear

    def __init__(self, cfg: Config, key):
        c1, c2 = cfg.channels
        k1, k2, k3 = jax.random.split(key, 3)

        def norm(size):
            return bnjax.equinox.BatchNorm(size, AXIS, momentum=cfg.bn_momentum, mode=cfg.mode)

        self.features = eqx.nn.Sequential(
            [
                eqx.nn.Conv2d(1, c1, 3, padding=1, key=k1),
                norm(c1),
                eqx.nn.Lambda(jax.nn.relu),
                eqx.nn.MaxPool2d(2, 2),
                eqx.nn.Conv2d(c1, c2, 3, padding=1, key=k2),
                norm(c2),
                eqx.nn.Lambda(jax.nn.relu),
            ]
        )
        self.head = eqx.nn.Linear(4 * 4 * c2, CLASSES, key=k3)

    def __call__(self, x, state):
        h, state = self.features(x, state)
        return self.head(jnp.ravel(h)), state


def batched(model):
    """``model`` over a batch of examples: BatchNorm's statistics span the named axis."""
    return eqx.filter_vmap(model, axis_name=AXIS, in_axes=(0, None), out_axes=(0, None))


def loss_fn(model, state, x, y):
    """Mean cross-entropy of a batch, and the new state (the auxiliary output)."""
    logits, state = batched(model)(x, state)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), state


def make_optimizer(cfg: Config, total_steps: int):
    """SGD with Nesterov momentum and a cosine decay of the learning rate to 0."""

    def schedule(count):  # the count cast explicitly: optax's own mixes int and float
        done = jnp.minimum(count.astype(jnp.float32) / max(total_steps, 1), 1.0)
        return cfg.learning_rate * 0.5 * (1.0 + jnp.cos(jnp.pi * done))

    return optax.sgd(schedule, momentum=cfg.momentum, nesterov=True)


def make_steps(optimizer):
    """The jitted train step (returns the new ``eqx.nn.State``) and evaluation step."""

    @eqx.filter_jit
    def train_step(model, state, opt_state, x, y):
        grad_fn = eqx.filter_value_and_grad(loss_fn, has_aux=True)
        (loss, state), grads = grad_fn(model, state, x, y)
        params = eqx.filter(model, eqx.is_array)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return eqx.apply_updates(model, updates), state, opt_state, loss

    @eqx.filter_jit
    def accuracy(model, state, x, y):
        logits, _ = batched(eqx.nn.inference_mode(model))(x, state)
        return jnp.mean((jnp.argmax(logits, -1) == y).astype(jnp.float32))

    return train_step, accuracy


def audit_step(model, state, cfg: Config) -> list:
    """``bnjax.testing.audit`` of one train step: traced, nothing runs."""
    x = jax.ShapeDtypeStruct((cfg.batch_size, 1, 8, 8), jnp.float32)
    y = jax.ShapeDtypeStruct((cfg.batch_size,), jnp.int32)

    def step(model, state, x, y):
        loss, state = loss_fn(model, state, x, y)
        return loss, state

    return bnjax.testing.audit(step, model, state, x, y, expect="train")


def run_epoch(train, x, y, rng, cfg: Config, epoch: int):
    """One shuffled pass over the training set; returns the new ``train`` tuple and the
    mean loss."""
    from tqdm.auto import tqdm

    model, state, opt_state, train_step = train
    n = len(x) - len(x) % cfg.batch_size
    order = rng.permutation(len(x))[:n].reshape(-1, cfg.batch_size)
    bar = tqdm(order, desc=f"epoch {epoch:2d}", leave=False, disable=not cfg.progress)
    total = 0.0
    for i, idx in enumerate(bar, start=1):
        model, state, opt_state, loss = train_step(
            model, state, opt_state, jnp.asarray(x[idx]), jnp.asarray(y[idx])
        )
        total += float(loss)
        bar.set_postfix(loss=f"{total / i:.3f}", refresh=False)
    return (model, state, opt_state, train_step), total / len(order)


def main(argv=None) -> dict:
    cfg = config_from_argv(Config, DEFAULT_CONFIG, argv)
    start = time.perf_counter()
    x_tr, y_tr, x_te, y_te = load_split(cfg.test_fraction, cfg.seed)
    # Equinox's convolutions take channels first: (n, 8, 8, 1) -> (n, 1, 8, 8).
    x_tr, x_te = np.moveaxis(x_tr, -1, 1), np.moveaxis(x_te, -1, 1)
    model, state = eqx.nn.make_with_state(CNN)(cfg, jax.random.key(cfg.seed))
    findings = audit_step(model, state, cfg)
    print(f"audit of the train step: {findings or 'every BatchNorm state update is returned'}")
    total_steps = cfg.epochs * (len(x_tr) // cfg.batch_size)
    optimizer = make_optimizer(cfg, total_steps)
    train_step, accuracy = make_steps(optimizer)
    train = (model, state, optimizer.init(eqx.filter(model, eqx.is_array)), train_step)
    rng = np.random.default_rng(cfg.seed)
    history = {"train_loss": [], "test_accuracy": []}
    for epoch in range(1, cfg.epochs + 1):
        train, loss = run_epoch(train, x_tr, y_tr, rng, cfg, epoch)
        test_accuracy = float(accuracy(train[0], train[1], jnp.asarray(x_te), jnp.asarray(y_te)))
        history["train_loss"].append(loss)
        history["test_accuracy"].append(test_accuracy)
        print(f"epoch {epoch:2d}  train loss {loss:.4f}  |  test accuracy {test_accuracy:.4f}")
    model, state = train[0], train[1]
    seconds = time.perf_counter() - start
    count = int(state.get(model.features[1].state_index).count)
    print(
        f"\ntest accuracy {history['test_accuracy'][-1]:.4f} in inference mode (running "
        f"statistics of {count} batches)\nwall time: {seconds:.1f} s"
    )
    return {
        "config": cfg,
        "test_accuracy": history["test_accuracy"][-1],
        "history": history,
        "audit": findings,
        "model": model,
        "state": state,
        "seconds": seconds,
    }


if __name__ == "__main__":
    main()
