"""Precise-BN recalibration: exact population statistics of every BatchNorm layer's input.

Running averages lag behind the weights they were collected with. Recalibration (Wu and
Johnson, 2021, "Rethinking Batch in BatchNorm") replaces them by exact statistics over a
set of batches, computed with the final weights.

:func:`recalibrate` swaps every ``BatchNormState`` in the model's state for a
``PopulationAccumulator`` and runs the unchanged model in training mode.
``BatchNorm.apply`` takes the accumulator in place of the state: it normalizes exactly as
in training (batch statistics, so every layer sees the inputs it saw in training) and
merges the batch's count, mean and second central moment into the accumulator with
Chan's parallel formula (``population.py``). Each accumulator then becomes a
``BatchNormState`` holding the exact mean and the exact **population variance** of the
layer's input over all batches (times ``n / (n - 1)`` for ``running_var="unbiased"``),
not a mean of batch variances.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import jax

from bnjax._src.population import PopulationAccumulator, finish, start
from bnjax._src.types import BatchNormState


def _is_state(leaf) -> bool:
    return isinstance(leaf, BatchNormState)


def recalibrate(model_apply: Callable, params, state, batches: Iterable, *, jit: bool = True):
    """Replaces every running state in ``state`` by exact population statistics.

    The model runs in training mode (batch statistics, as in training) over ``batches``
    with the given ``params``; every :class:`BatchNormState` in ``state``, nested anywhere
    in the pytree, comes back with the exact mean and population variance of its layer's
    input over all the batches, and ``count`` set to the number of batches (of virtual
    batches, for a layer with ``virtual_batch_size``: each is merged as its own batch, as
    training averages each in).

    Args:
      model_apply: ``(params, state, x, *, training) -> (y, new_state)``, the signature
        of ``BatchNorm.apply``; any model that threads its BatchNorm states through
        ``BatchNorm.apply`` works unchanged.
      params: the model's parameters.
      state: the model's state pytree containing ``BatchNormState`` leaves.
      batches: an iterable of model inputs ``x``.
      jit: compile one step per batch shape with ``jax.jit`` (default True).

    Returns:
      The state pytree with every ``BatchNormState`` recalibrated.

    Raises:
      ValueError: ``state`` contains no ``BatchNormState``, or ``batches`` is empty.

    Example:
      >>> import jax, bnjax
      >>> bn = bnjax.BatchNorm()
      >>> params, state = bn.init((16, 3))
      >>> data = [jax.random.normal(jax.random.key(i), (16, 3)) for i in range(4)]
      >>> state = bnjax.recalibrate(bn.apply, params, state, data)
      >>> int(state.count)
      4
    """
    leaves = jax.tree.leaves(state, is_leaf=_is_state)
    if not any(_is_state(leaf) for leaf in leaves):
        raise ValueError(
            f"state contains no BatchNormState (got {type(state).__name__}); expected the "
            "state pytree of a model with at least one BatchNorm"
        )
    populations = jax.tree.map(lambda s: start(s) if _is_state(s) else s, state, is_leaf=_is_state)

    def step(p, populations, x):
        return model_apply(p, populations, x, training=True)[1]

    step = jax.jit(step) if jit else step
    seen = 0
    for x in batches:
        populations = step(params, populations, x)
        seen += 1
    if not seen:
        raise ValueError("batches is empty; expected at least one batch to recalibrate on")

    def is_population(leaf):
        return isinstance(leaf, PopulationAccumulator)

    return jax.tree.map(
        lambda p: finish(p) if is_population(p) else p, populations, is_leaf=is_population
    )
