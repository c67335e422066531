"""``TrainState``: everything a training loop threads from one step to the next.

A NamedTuple, so it is a pytree: it goes through ``jax.jit`` (and can be donated),
``jax.vmap`` (an ensemble is a ``TrainState`` whose leaves have a leading member axis),
``shard_map`` and checkpoints unchanged. Updated with ``._replace``, never mutated.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp


class TrainState(NamedTuple):
    """The state of a training run.

    Attributes:
      step: int32 scalar, the number of optimizer steps taken.
      params: the model's trainable parameters (any pytree, BatchNorm's ``scale`` and
        ``bias`` included).
      bn_state: the model's non-trainable BatchNorm state (any pytree of
        ``BatchNormState``), threaded through every training step.
      opt_state: the optimizer's state for ``params``.

    Example:
      >>> import optax, bnjax
      >>> from bnjax.training import TrainState
      >>> params, bn_state = bnjax.BatchNorm().init((4, 3))
      >>> state = TrainState.create(params, bn_state, optax.sgd(0.1))
      >>> int(state.step)
      0
    """

    step: jax.Array
    params: Any
    bn_state: Any
    opt_state: Any

    @classmethod
    def create(cls, params, bn_state, optimizer) -> TrainState:
        """A fresh state at step 0, with the optimizer initialized on ``params``.

        Args:
          params: the trainable parameters.
          bn_state: the BatchNorm state (running statistics, counts).
          optimizer: an ``optax.GradientTransformation`` (anything with ``init``).

        Returns:
          ``TrainState(step=0, params, bn_state, optimizer.init(params))``.

        Raises:
          TypeError: ``optimizer`` has no ``init`` method.
        """
        init = getattr(optimizer, "init", None)
        if not callable(init):
            raise TypeError(
                f"optimizer must be an optax.GradientTransformation (with init and update); "
                f"got {type(optimizer).__name__}"
            )
        return cls(jnp.zeros((), jnp.int32), params, bn_state, init(params))
