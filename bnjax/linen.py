"""``bnjax.linen.BatchNorm``: a drop-in replacement for ``flax.linen.BatchNorm``.

Swap one line and keep the model, the checkpoints and the training loop::

    import bnjax.linen
    norm = bnjax.linen.BatchNorm(use_running_average=not train, momentum=0.9)

The variables are Flax's (``params/{scale,bias}``, ``batch_stats/{mean,var}``, same
shapes and dtypes), so Flax's own variables load and run unchanged. The numbers are
bnjax's: exact variance on offset data, statistics reduced in at least float32, exact
cross-device statistics with ``axis_name`` (counts and sums, not a mean of means), and the
closed-form gradient. All maths goes through :meth:`bnjax.BatchNorm.apply`.
"""

from bnjax._src.linen import BatchNorm

__all__ = ["BatchNorm"]
