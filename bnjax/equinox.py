"""``bnjax.equinox.BatchNorm``: a drop-in replacement for ``eqx.nn.BatchNorm``.

Swap one line and keep the model, ``eqx.nn.make_with_state``, the ``eqx.nn.State`` and the
training loop::

    import bnjax.equinox
    self.norm = bnjax.equinox.BatchNorm(64, "batch", mode="batch")

The layer takes Equinox's arguments, normalizes one example inside ``vmap`` with an
``axis_name`` as Equinox's does, follows ``eqx.nn.inference_mode``, and keeps its running
statistics in the ``eqx.nn.State`` (one ``bnjax.BatchNormState``). The numbers are
bnjax's: all maths goes through :meth:`bnjax.BatchNorm.apply`. Checkpoints of
``eqx.nn.BatchNorm`` convert with ``bnjax.interop.from_equinox`` and ``to_equinox``.
"""

from bnjax._src.equinox import BatchNorm

__all__ = ["BatchNorm"]
