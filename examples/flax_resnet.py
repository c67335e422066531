"""A small ResNet in Flax linen with bnjax's BatchNorm, trained on scikit-learn's digits.

The model is plain Flax; the only bnjax line is the normalization layer,
``bnjax.linen.BatchNorm``, a drop-in replacement for ``flax.linen.BatchNorm``. Training
normalizes with each batch's statistics and updates ``batch_stats``
(``use_running_average=False``, ``mutable=["batch_stats"]``); evaluation normalizes with
the running statistics (``use_running_average=True``) and changes nothing.

Run: ``python examples/flax_resnet.py [--config configs/flax_resnet.toml] [key=value ...]``
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from _config import config_from_argv  # noqa: E402
from sklearn.datasets import load_digits

import bnjax.linen  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = ROOT / "configs" / "flax_resnet.toml"


@dataclasses.dataclass(frozen=True)
class Config:
    """Settings of the digits ResNet (see ``configs/flax_resnet.toml``)."""

    seed: int = 0
    steps: int = 300
    batch_size: int = 128
    learning_rate: float = 3e-3
    width: int = 16
    blocks: int = 2
    momentum: float = 0.9
    test_fraction: float = 0.25
    log_every: int = 50


class Block(nn.Module):
    """``relu(x + BN(conv(relu(BN(conv(x))))))``; the last scale starts at zero."""

    width: int
    momentum: float

    @nn.compact
    def __call__(self, x, train: bool):
        norm = functools.partial(
            bnjax.linen.BatchNorm, use_running_average=not train, momentum=self.momentum
        )
        y = nn.relu(norm()(nn.Conv(self.width, (3, 3), use_bias=False)(x)))
        y = norm(scale_init=nn.initializers.zeros)(nn.Conv(self.width, (3, 3), use_bias=False)(y))
        return nn.relu(x + y)


class ResNet(nn.Module):
    """A 3x3 stem, ``blocks`` residual blocks, global average pooling and a classifier."""

    width: int
    blocks: int
    momentum: float
    classes: int = 10

    @nn.compact
    def __call__(self, x, train: bool):
        norm = bnjax.linen.BatchNorm(use_running_average=not train, momentum=self.momentum)
        x = nn.relu(norm(nn.Conv(self.width, (3, 3), use_bias=False)(x)))
        for _ in range(self.blocks):
            x = Block(self.width, self.momentum)(x, train)
        return nn.Dense(self.classes)(jnp.mean(x, axis=(1, 2)))


def digits(test_fraction: float, seed: int):
    """The 8x8 digits as ``(n, 8, 8, 1)`` float32 in [0, 1] with int32 labels, split."""
    data = load_digits()
    images = (data.images / 16.0).astype(np.float32)[..., None]
    labels = data.target.astype(np.int32)
    order = np.random.default_rng(seed).permutation(len(labels))
    n_test = int(round(test_fraction * len(labels)))
    test, train = order[:n_test], order[n_test:]
    return (images[train], labels[train]), (images[test], labels[test])


def make_steps(model: ResNet, tx):
    """The jitted training step (batch statistics, updated) and evaluation (running ones)."""

    @jax.jit
    def train_step(params, batch_stats, opt_state, x, y):
        def loss_fn(params):
            logits, updates = model.apply(
                {"params": params, "batch_stats": batch_stats},
                x,
                train=True,
                mutable=["batch_stats"],
            )
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            return loss, updates["batch_stats"]

        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state, loss

    @jax.jit
    def accuracy(params, batch_stats, x, y):
        logits = model.apply({"params": params, "batch_stats": batch_stats}, x, train=False)
        return jnp.mean(jnp.argmax(logits, axis=-1) == y)

    return train_step, accuracy


def train(cfg: Config) -> dict:
    """Trains the ResNet for ``cfg.steps`` steps and evaluates it with running statistics."""
    (x_train, y_train), (x_test, y_test) = digits(cfg.test_fraction, cfg.seed)
    model = ResNet(cfg.width, cfg.blocks, cfg.momentum)
    variables = jax.jit(model.init, static_argnames="train")(
        jax.random.key(cfg.seed), x_train[:1], train=False
    )
    params, batch_stats = variables["params"], variables["batch_stats"]
    tx = optax.adam(cfg.learning_rate)
    opt_state = tx.init(params)
    train_step, accuracy = make_steps(model, tx)
    rng = np.random.default_rng(cfg.seed)
    losses = []
    for step in range(1, cfg.steps + 1):
        idx = rng.choice(len(y_train), cfg.batch_size, replace=False)
        params, batch_stats, opt_state, loss = train_step(
            params, batch_stats, opt_state, x_train[idx], y_train[idx]
        )
        losses.append(float(loss))
        if step % cfg.log_every == 0 or step == cfg.steps:
            print(f"step {step:4d}  train loss {losses[-1]:.4f}")
    test_acc = float(accuracy(params, batch_stats, x_test, y_test))
    train_acc = float(accuracy(params, batch_stats, x_train, y_train))
    return {
        "losses": losses,
        "train_accuracy": train_acc,
        "test_accuracy": test_acc,
        "variables": {"params": params, "batch_stats": batch_stats},
    }


def main(argv=None) -> dict:
    """Runs the example; ``argv`` is ``[--config PATH] [key=value ...]`` (default: sys.argv)."""
    cfg = config_from_argv(Config, DEFAULT_CONFIG, sys.argv[1:] if argv is None else argv)
    print(f"digits ResNet with bnjax.linen.BatchNorm: {cfg}")
    result = train(cfg)
    print(
        f"eval with running statistics (use_running_average=True): "
        f"train accuracy {result['train_accuracy']:.3f}, "
        f"test accuracy {result['test_accuracy']:.3f}"
    )
    return result


if __name__ == "__main__":
    main()
