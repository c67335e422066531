"""``bnjax.nnx.BatchNorm``: a drop-in replacement for ``flax.nnx.BatchNorm``.

Swap one line and keep the model, its state and the training loop::

    import bnjax.nnx
    self.norm = bnjax.nnx.BatchNorm(64, momentum=0.9, rngs=rngs)

The module holds Flax's variables (``scale`` and ``bias`` as ``nnx.Param``, ``mean`` and
``var`` as ``nnx.BatchStat``, same shapes and dtypes), so a Flax ``nnx.BatchNorm``'s state
loads into it unchanged, and it follows ``.train()``, ``.eval()`` and ``nnx.view``. The
numbers are bnjax's: all maths goes through :meth:`bnjax.BatchNorm.apply`.
"""

from bnjax._src.nnx import BatchNorm

__all__ = ["BatchNorm"]
