"""Train a small CNN with bnjax BatchNorm on the scikit-learn digits, and evaluate it right.

Each epoch trains with a jitted, buffer-donating step (batch statistics, state threaded
explicitly) and then evaluates the test set in inference mode (running statistics). At
the end the state is checkpointed and restored, the train/test curves are plotted, and
the classic failure is shown beside the right answer: the same trained parameters
evaluated with the initial, never-updated statistics (mean 0, variance 1).

Run: ``python examples/train_digits.py [--config configs/train_digits.toml] [key=value ...]``
"""

from __future__ import annotations

import dataclasses
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
from _digits import CNN, cross_entropy, load_split, loss_and_accuracy  # noqa: E402

from bnjax import training  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = ROOT / "configs" / "train_digits.toml"


@dataclasses.dataclass(frozen=True)
class Config:
    """Settings of the digits example (see ``configs/train_digits.toml``)."""

    seed: int = 0
    epochs: int = 12
    batch_size: int = 32
    learning_rate: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    bn_momentum: float = 0.9
    channels: tuple[int, int] = (32, 64)
    test_fraction: float = 0.2
    out_dir: str = "out/train_digits"
    progress: bool = True


def make_steps(model: CNN, cfg: Config, total_steps: int):
    """The optimizer, the jitted train step (state donated) and the jitted eval step."""

    def schedule(count):  # cosine decay to 0, the count cast explicitly (strict dtype rules)
        done = jnp.minimum(count.astype(jnp.float32) / max(total_steps, 1), 1.0)
        return cfg.learning_rate * 0.5 * (1.0 + jnp.cos(jnp.pi * done))

    optimizer = optax.chain(
        optax.add_decayed_weights(cfg.weight_decay),
        optax.sgd(schedule, momentum=cfg.momentum, nesterov=True),
    )
    train_step = training.make_train_step(
        model.apply, cross_entropy, optimizer, metric_fn=loss_and_accuracy
    )
    eval_step = training.make_eval_step(model.apply, loss_and_accuracy)
    return optimizer, jax.jit(train_step, donate_argnums=0), jax.jit(eval_step)


def run_epoch(state, train_step, x, y, rng, cfg: Config, epoch: int):
    """One shuffled pass over the training set; returns the state and mean train metrics."""
    from tqdm.auto import tqdm

    n = len(x) - len(x) % cfg.batch_size
    order = rng.permutation(len(x))[:n].reshape(-1, cfg.batch_size)
    bar = tqdm(order, desc=f"epoch {epoch:2d}", leave=False, disable=not cfg.progress)
    totals = {"loss": 0.0, "accuracy": 0.0}
    for i, idx in enumerate(bar, start=1):
        state, metrics = train_step(state, {"x": jnp.asarray(x[idx]), "y": jnp.asarray(y[idx])})
        for k in totals:
            totals[k] += float(metrics[k])
        bar.set_postfix(
            loss=f"{totals['loss'] / i:.3f}", acc=f"{totals['accuracy'] / i:.3f}", refresh=False
        )
    return state, {k: v / len(order) for k, v in totals.items()}


def plot_curves(history: dict, path: Path) -> Path:
    """Writes a PNG of the train and test loss and accuracy per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    epochs = np.arange(1, len(history["train_loss"]) + 1)
    for ax, name in zip(axes, ("loss", "accuracy"), strict=True):
        ax.plot(epochs, history[f"train_{name}"], label="train (batch statistics)")
        ax.plot(epochs, history[f"test_{name}"], label="test (inference mode)")
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.legend()
    fig.suptitle("bnjax: small CNN on scikit-learn digits")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def train(cfg: Config) -> dict:
    """Trains, evaluating the test set in inference mode after each epoch."""
    x_tr, y_tr, x_te, y_te = load_split(cfg.test_fraction, cfg.seed)
    test = {"x": jnp.asarray(x_te), "y": jnp.asarray(y_te)}
    model = CNN(channels=cfg.channels, bn_momentum=cfg.bn_momentum)
    params, bn_state = model.init(jax.random.key(cfg.seed))
    total_steps = cfg.epochs * (len(x_tr) // cfg.batch_size)
    optimizer, train_step, eval_step = make_steps(model, cfg, total_steps)
    state = training.TrainState.create(params, bn_state, optimizer)
    rng = np.random.default_rng(cfg.seed)
    history = {k: [] for k in ("train_loss", "train_accuracy", "test_loss", "test_accuracy")}
    for epoch in range(1, cfg.epochs + 1):
        state, train_metrics = run_epoch(state, train_step, x_tr, y_tr, rng, cfg, epoch)
        test_metrics = eval_step(state, test)
        for k in ("loss", "accuracy"):
            history[f"train_{k}"].append(train_metrics[k])
            history[f"test_{k}"].append(float(test_metrics[k]))
        print(
            f"epoch {epoch:2d}  train loss {train_metrics['loss']:.4f} acc "
            f"{train_metrics['accuracy']:.4f}  |  test (inference mode) loss "
            f"{history['test_loss'][-1]:.4f} acc {history['test_accuracy'][-1]:.4f}"
        )
    _, never_updated = model.init(jax.random.key(cfg.seed))  # the classic failure: mean 0, var 1
    stale = eval_step(state._replace(bn_state=never_updated), test)
    return {
        "state": state,
        "history": history,
        "stale": stale,
        "eval_step": eval_step,
        "test": test,
    }


def report(result: dict, restored: dict) -> None:
    """Prints the right evaluation beside the classic failure."""
    history, stale, state = result["history"], result["stale"], result["state"]
    rows = [
        (
            "inference mode, running statistics",
            history["test_accuracy"][-1],
            history["test_loss"][-1],
        ),
        ("same params, never-updated statistics", float(stale["accuracy"]), float(stale["loss"])),
        ("restored from the checkpoint", float(restored["accuracy"]), float(restored["loss"])),
    ]
    print()
    for label, acc, loss in rows:
        print(f"test accuracy {acc:.4f}  loss {loss:.4f}  <- {label}")
    print(f"(running statistics folded in {int(state.bn_state['bn1'].count)} batches vs 0)")


def main(argv=None) -> dict:
    cfg = config_from_argv(Config, DEFAULT_CONFIG, argv)
    start = time.perf_counter()
    result = train(cfg)
    out = Path(cfg.out_dir)
    ckpt = training.save(out / "checkpoint", result["state"])
    restored = training.restore(out / "checkpoint", like=result["state"])
    restored_metrics = result["eval_step"](restored, result["test"])
    png = plot_curves(result["history"], out / "train_digits.png")
    seconds = time.perf_counter() - start
    report(result, restored_metrics)
    print(f"checkpoint: {ckpt}\ncurves: {png}\nwall time: {seconds:.1f} s")
    return {
        "config": cfg,
        "test_accuracy": result["history"]["test_accuracy"][-1],
        "stale_accuracy": float(result["stale"]["accuracy"]),
        "restored_accuracy": float(restored_metrics["accuracy"]),
        "history": result["history"],
        "checkpoint": os.fspath(ckpt),
        "plot": os.fspath(png),
        "state": result["state"],
        "seconds": seconds,
    }


if __name__ == "__main__":
    main()
