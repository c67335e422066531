"""The classic TF1 batch-norm pitfalls, replayed with bnjax's explicit state.

Each step prints bnjax's number beside the value TF1 published for the same setting
(``momentum=0.99, epsilon=1e-3``, a single feature), then shows the fix for the "-7.77"
puzzle and plots how the running statistics converge under the three averaging modes
(and the unbiased running variance, on batches of 8 rows).

Run: ``python examples/seed_walkthrough.py [--config PATH] [key=value ...]``
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import bnjax

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = ROOT / "configs" / "seed_walkthrough.toml"

# The values TF1's tf.layers.batch_normalization printed for the same inputs.
TF1 = {
    "inference on fresh state": [-9.995004, 0.0, 9.995004],
    "training": [-1.2247357, 0.0, 1.2247357],
    "training, batch of one": [0.0],
    "inference after 1 update": [-7.766966],
    "inference after 1000 updates": [-1.224762],
    "moving variance after 1000 updates": [66.66382],
}


@dataclasses.dataclass(frozen=True)
class Config:
    """Settings of the walkthrough (see ``configs/seed_walkthrough.toml``)."""

    momentum: float = 0.99
    epsilon: float = 1e-3
    updates: int = 1000
    plot_steps: int = 300
    out_dir: str = "out"


def _row(label: str, ours, theirs) -> tuple[str, float]:
    ours = np.ravel(np.asarray(ours, np.float64))
    err = float(np.max(np.abs(ours - np.asarray(theirs)))) if len(theirs) else 0.0
    text = np.array2string(ours, precision=7, floatmode="fixed", suppress_small=True)
    print(f"  {label:<36} bnjax {text:<36} TF1 {theirs}  |diff| {err:.1e}")
    return label, err


def _train_steps(bn, params, state, x, steps):
    """Feeds ``x`` ``steps`` times in training mode; returns the final state and the running
    variance after each update (index 0: before any)."""

    def step(state, _):
        state = bn.apply(params, state, x, training=True)[1]
        return state, state.var

    final, var = jax.jit(lambda s: jax.lax.scan(step, s, length=steps))(state)
    return final, np.concatenate([np.asarray(state.var)[None], np.asarray(var)])[:, 0]


def replay_tf1(cfg: Config) -> dict[str, float]:
    """Replays the notebook's cells; returns each step's largest |bnjax - TF1|."""
    bn = bnjax.BatchNorm(momentum=cfg.momentum, epsilon=cfg.epsilon)
    x = jnp.array([[-10.0], [0.0], [10.0]])
    one = jnp.array([[-10.0]])
    params, fresh = bn.init(x)
    errors = {}
    print("1. training=False on a fresh state uses mean 0, var 1: barely normalized")
    y, _ = bn.apply(params, fresh, x, training=False)
    errors.update([_row("inference on fresh state", y, TF1["inference on fresh state"])])
    print("2. training=True uses this batch's statistics, and returns the updated state")
    y, after_one = bn.apply(params, fresh, x, training=True)
    errors.update([_row("training", y, TF1["training"])])
    print("3. a batch of one in training is its own mean: it normalizes to zero (bnjax warns)")
    y, _ = bn.apply(params, fresh, one, training=True, update_stats=False)
    errors.update([_row("training, batch of one", y, TF1["training, batch of one"])])
    print("4. one update later, inference is 'neither here nor there'")
    y, _ = bn.apply(params, after_one, one, training=False)
    errors.update([_row("inference after 1 update", y, TF1["inference after 1 update"])])
    print(f"5. after {cfg.updates} updates the moving average has converged")
    final, _ = _train_steps(bn, params, fresh, x, cfg.updates)
    y, _ = bn.apply(params, final, one, training=False)
    errors.update([_row("inference after 1000 updates", y, TF1["inference after 1000 updates"])])
    label = "moving variance after 1000 updates"
    errors.update([_row(label, final.var, TF1[label])])
    return errors


def fix_with_debiasing(cfg: Config) -> float:
    """The "-7.77" puzzle disappears with a zero-debiased average: one update suffices."""
    bn = bnjax.BatchNorm(momentum=cfg.momentum, epsilon=cfg.epsilon, averaging="debiased")
    x = jnp.array([[-10.0], [0.0], [10.0]])
    params, state = bn.init(x)
    _, state = bn.apply(params, state, x, training=True)
    y, _ = bn.apply(params, state, jnp.array([[-10.0]]), training=False)
    print('6. the fix: averaging="debiased" weighs the first batch fully')
    label = "inference after 1 update (debiased)"
    print(f"  {label:<36} bnjax {float(y[0, 0]):.7f}  (batch's own statistics: -1.2247357)")
    return float(y[0, 0])


MODES = (
    ("ema", "biased"),
    ("debiased", "biased"),
    ("cumulative", "biased"),
    ("cumulative", "unbiased"),
)


def convergence(cfg: Config) -> dict[str, dict[str, np.ndarray]]:
    """Running variance after each update, per averaging mode, for two streams of batches.

    ``"notebook batch"`` feeds ``[-10, 0, 10]`` again and again (true variance 66.67);
    ``"noisy batches"`` feeds fresh batches of 8 drawn from N(5, 8**2) (variance 64): the
    biased batch variance averages 7/8 of it, 56; ``running_var="unbiased"`` removes that.
    """
    fixed = jnp.array([[-10.0], [0.0], [10.0]])
    noisy = 5.0 + 8.0 * jax.random.normal(jax.random.key(0), (cfg.plot_steps, 8, 1))
    curves: dict[str, dict[str, np.ndarray]] = {"notebook batch": {}, "noisy batches": {}}
    for mode, running_var in MODES:
        bn = bnjax.BatchNorm(
            momentum=cfg.momentum, epsilon=cfg.epsilon, averaging=mode, running_var=running_var
        )
        label = f'"{mode}"' + (', running_var="unbiased"' if running_var == "unbiased" else "")
        params, state = bn.init(fixed)
        if running_var == "biased":
            _, curves["notebook batch"][label] = _train_steps(
                bn, params, state, fixed, cfg.plot_steps
            )

        def step(state, x, bn=bn, params=params):
            state = bn.apply(params, state, x, training=True)[1]
            return state, state.var[0]

        _, var = jax.lax.scan(step, state, noisy)
        curves["noisy batches"][label] = np.concatenate([[1.0], np.asarray(var)])
    return curves


def plot(curves: dict[str, dict[str, np.ndarray]], path: Path) -> Path:
    """Writes a PNG of the running variance against the number of updates."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    targets = {"notebook batch": 200 / 3, "noisy batches": 64.0}
    titles = {
        "notebook batch": "the notebook batch [-10, 0, 10] (3 rows), again and again",
        "noisy batches": "fresh batches of 8 rows from N(5, 8^2)\n"
        "(a biased batch variance averages 7/8 of 64 = 56)",
    }
    # "debiased" and "cumulative" coincide on a repeated batch: distinct line styles and
    # markers keep both visible where they overlap.
    styles = [
        {"linestyle": "-"},
        {"linestyle": "--", "marker": "o", "markevery": 0.1},
        {"linestyle": ":", "marker": "x", "markevery": (0.05, 0.1)},
        {"linestyle": "-."},
    ]
    for ax, (stream, by_mode) in zip(axes, curves.items(), strict=True):
        for (mode, curve), style in zip(by_mode.items(), styles, strict=False):
            ax.plot(np.arange(len(curve)), curve, label=f"averaging={mode}", **style)
        ax.axhline(targets[stream], color="gray", linestyle=":", label="true variance")
        ax.set_title(titles[stream], fontsize=10)
        ax.set_xlabel("training updates")
        ax.legend(loc="lower right", fontsize=8)
    axes[0].set_ylabel("running variance")
    fig.suptitle(
        'bnjax running variance: averaging="ema", "debiased", "cumulative" '
        '(and "cumulative" with running_var="unbiased"), momentum 0.99'
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def load(argv) -> Config:
    """Reads the config file, then applies ``key=value`` overrides from ``argv``."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _config import config_from_argv

    return config_from_argv(Config, DEFAULT_CONFIG, argv)


def main(argv=None) -> dict:
    cfg = load(sys.argv[1:] if argv is None else argv)
    print("bnjax replays the TF1 batch-norm notebook (momentum=0.99, epsilon=1e-3)\n")
    errors = replay_tf1(cfg)
    debiased = fix_with_debiasing(cfg)
    curves = convergence(cfg)
    path = plot(curves, Path(cfg.out_dir) / "seed_walkthrough.png")
    print(f"\nplot of the running variance under the three averaging modes: {path}")
    print(
        '  left: "ema" starts at var 1 and needs hundreds of updates; "debiased" and '
        '"cumulative" are right from the first.\n  right: with batches of 8 rows, the '
        'biased batch variance settles at 7/8 of the true 64; running_var="unbiased" '
        "removes that bias."
    )
    return {"errors": errors, "debiased": debiased, "plot": os.fspath(path), "curves": curves}


if __name__ == "__main__":
    main()
