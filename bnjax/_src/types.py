"""The pytrees that batch norm passes in and out: parameters and running state."""

from __future__ import annotations

from typing import NamedTuple

import jax

from bnjax._src import averaging


class BatchNormParams(NamedTuple):
    """Learned affine parameters, each of the feature shape (or ``None`` when disabled).

    Attributes:
      scale: gamma, multiplies the normalized input; ``None`` when ``scale=False``.
      bias: beta, added after scaling; ``None`` when ``center=False``.
    """

    scale: jax.Array | None
    bias: jax.Array | None


class BatchNormState(NamedTuple):
    """Running statistics, threaded explicitly through every call.

    ``BatchNorm.apply`` reads a state through :attr:`running` (the statistics it
    normalizes with in inference) and updates it with :meth:`fold`; the recalibration
    accumulator (``population.py``) has the same two members.

    Attributes:
      mean: running mean, of the feature shape.
      var: running variance, of the feature shape.
      count: int32 scalar, the number of batches averaged into ``mean`` and ``var``.
    """

    mean: jax.Array
    var: jax.Array
    count: jax.Array

    accumulates = False  # marks.py: a running average, whose count moves once per batch

    @property
    def running(self) -> BatchNormState:
        """The statistics to normalize with in inference: the state itself."""
        return self

    def fold(self, moments, bn) -> BatchNormState:
        """This state with one batch's ``moments`` averaged in as ``bn`` (a
        ``bnjax.BatchNorm``) says (``averaging.update``)."""
        return averaging.update(
            self,
            moments,
            momentum=bn.momentum,
            averaging=bn.averaging,
            running_var=bn.running_var,
            skip_nonfinite=bn.skip_nonfinite,
        )
