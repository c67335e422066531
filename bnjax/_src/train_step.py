"""Pure train and eval steps: ``train_step(state, batch) -> (state, metrics)``.

The steps close over the model, the loss and the optimizer and nothing else, so one
function serves every way of running it:

* ``jax.jit(train_step, donate_argnums=0)``: one device, the old state's buffers reused.
* ``jax.vmap(train_step)``: an ensemble; every member has its own parameters, BatchNorm
  state and optimizer state, and equals training that member alone.
* ``jax.jit`` over a batch sharded across devices: XLA partitions the step; the batch
  statistics, the loss and the gradients are those of the full batch.
* ``jax.shard_map`` (or ``jax.pmap``) with ``axis_name``: each device runs the step on
  its shard. The model's ``BatchNorm(axis_name=...)`` combines the batch statistics
  exactly across devices, and its gradient sends every device's share back through
  them. The step differentiates the device's own loss with respect to parameters marked
  *per-device* (``vary_like``), then averages loss and gradients with one
  ``lax.pmean``: the mean of the per-device gradients is the gradient of the
  full-batch loss. Marking the parameters matters under ``shard_map``'s default
  ``check_vma=True``: a replicated parameter used with a per-device batch would
  otherwise have its per-device gradients summed by JAX, and the ``pmean`` after it
  would leave a gradient ``n`` times too large. The same code is right with
  ``check_vma=False`` and under ``pmap``, where nothing is summed implicitly. Shards must
  be of equal size.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

import jax
import jax.numpy as jnp
from jax import lax

from bnjax._src import extras

try:
    import optax
except ImportError as e:
    raise extras.missing("bnjax.training", "training", e) from e

from bnjax._src.sharding import vary_like
from bnjax._src.train_state import TrainState


def _as_metrics(value, scalar_key: str) -> dict:
    """``metric_fn``'s result as a dict: a scalar becomes ``{scalar_key: value}``."""
    if isinstance(value, dict):
        return dict(value)
    if jnp.ndim(value) != 0:
        raise ValueError(
            f"metric_fn must return a scalar or a dict of scalars; got shape {jnp.shape(value)}"
        )
    return {scalar_key: value}


def _check_batch(batch) -> None:
    if not isinstance(batch, dict) or "x" not in batch:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise TypeError(f'batch must be a dict with at least the key "x"; got {keys}')


def _check_callable(**fns) -> None:
    for name, fn in fns.items():
        if not callable(fn):
            raise TypeError(f"{name} must be callable; got {fn!r}")


def _mean_over(tree, axis_name):
    return tree if axis_name is None else lax.pmean(tree, axis_name)


def make_train_step(
    model_apply: Callable,
    loss_fn: Callable,
    optimizer,
    *,
    metric_fn: Callable | None = None,
    axis_name: Hashable | None = None,
) -> Callable:
    """Builds a pure training step.

    Args:
      model_apply: ``model_apply(params, bn_state, x, *, training) -> (outputs,
        new_bn_state)``; called with ``training=True``.
      loss_fn: ``loss_fn(outputs, batch) -> scalar``, the mean loss over the batch (over
        this device's shard under ``shard_map``).
      optimizer: an ``optax.GradientTransformation``.
      metric_fn: optional ``metric_fn(outputs, batch) -> scalar or dict`` evaluated on the
        training outputs (no gradient flows through it); its values join ``metrics``, a
        scalar as ``"metric"``; a ``"loss"`` key is the training loss (so one
        ``loss_and_accuracy`` serves the train and the eval step).
      axis_name: under ``shard_map`` or ``pmap``, the data-parallel axis: the loss, the
        gradients and the metrics are averaged over it. The model's BatchNorm layers
        should be built with the same ``axis_name``. None otherwise.

    Returns:
      ``train_step(state, batch) -> (new_state, metrics)``: ``state`` a
      :class:`TrainState`, ``batch`` a dict with at least ``"x"`` (the model's input,
      leading axis the batch); ``new_state`` has ``step + 1``, updated parameters,
      optimizer state and BatchNorm state; ``metrics`` a dict of scalars with ``"loss"``,
      the loss before the update.

    Raises:
      TypeError: a function argument is not callable, or ``optimizer`` has no ``update``;
        when called, ``batch`` is not a dict with ``"x"``.

    Example:
      >>> import jax, jax.numpy as jnp, optax, bnjax
      >>> from bnjax.training import TrainState, make_train_step
      >>> bn = bnjax.BatchNorm()
      >>> def apply(params, bn_state, x, *, training):
      ...     return bn.apply(params, bn_state, x, training=training)
      >>> def loss(outputs, batch):
      ...     return jnp.mean((outputs - batch["y"]) ** 2)
      >>> params, bn_state = bn.init((8, 3))
      >>> state = TrainState.create(params, bn_state, optax.sgd(1e-2))
      >>> step = jax.jit(make_train_step(apply, loss, optax.sgd(1e-2)), donate_argnums=0)
      >>> x = jnp.arange(24.0).reshape(8, 3)
      >>> state, metrics = step(state, {"x": x, "y": jnp.zeros((8, 3))})
      >>> int(state.step), int(state.bn_state.count)
      (1, 1)
    """
    _check_callable(model_apply=model_apply, loss_fn=loss_fn)
    if metric_fn is not None:
        _check_callable(metric_fn=metric_fn)
    if not callable(getattr(optimizer, "update", None)):
        raise TypeError(f"optimizer must be an optax.GradientTransformation; got {optimizer!r}")

    def objective(params, bn_state, batch):
        outputs, new_bn_state = model_apply(params, bn_state, batch["x"], training=True)
        return loss_fn(outputs, batch), (outputs, new_bn_state)

    def train_step(state: TrainState, batch) -> tuple[TrainState, dict]:
        _check_batch(batch)
        params = state.params
        if axis_name is not None:  # per-device gradients, averaged once below
            x0 = jax.tree.leaves(batch["x"])[0]  # the model input may be a pytree
            params = jax.tree.map(lambda p: vary_like(p, x0), params)
        grad_fn = jax.value_and_grad(objective, has_aux=True)
        (loss, (outputs, new_bn_state)), grads = grad_fn(params, state.bn_state, batch)
        loss, grads = _mean_over((loss, grads), axis_name)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss}
        if metric_fn is not None:  # "loss" is the training loss: a scalar is "metric"
            extra = _as_metrics(metric_fn(lax.stop_gradient(outputs), batch), "metric")
            metrics = {**_mean_over(extra, axis_name), "loss": loss}
        new_state = state._replace(
            step=state.step + 1, params=params, bn_state=new_bn_state, opt_state=opt_state
        )
        return new_state, metrics

    return train_step


def make_eval_step(
    model_apply: Callable, metric_fn: Callable, *, axis_name: Hashable | None = None
) -> Callable:
    """Builds a pure evaluation step in inference mode.

    Args:
      model_apply: as for :func:`make_train_step`; called with ``training=False``, so
        BatchNorm normalizes with the running statistics.
      metric_fn: ``metric_fn(outputs, batch) -> scalar or dict of scalars``; a scalar is
        returned as ``{"loss": value}``, so a loss function serves as a metric.
      axis_name: under ``shard_map`` or ``pmap``, average the metrics over this axis.

    Returns:
      ``eval_step(state, batch) -> metrics``. The state is read, never changed.

    Raises:
      TypeError: a function argument is not callable; when called, ``batch`` is not a
        dict with ``"x"``.
      ValueError: when called, ``metric_fn`` returns an array that is not a scalar.
    """
    _check_callable(model_apply=model_apply, metric_fn=metric_fn)

    def eval_step(state: TrainState, batch) -> dict:
        _check_batch(batch)
        outputs, _ = model_apply(state.params, state.bn_state, batch["x"], training=False)
        return _mean_over(_as_metrics(metric_fn(outputs, batch), "loss"), axis_name)

    return eval_step
