"""Ghost batch norm (Hoffer et al., 2017): statistics over virtual batches of ``k``.

With ``BatchNorm(virtual_batch_size=k)``, training splits the batch axis (axis 0) into
contiguous chunks of ``k`` and normalizes each chunk with its own statistics. The running
statistics then take the chunks one after another, in order, exactly as if each chunk had
been its own training step: ``state.count`` grows by the number of chunks. Inference, and
``training=False, update_stats=True``, use the whole batch as usual.

The chunks are a ``jax.vmap`` of the ordinary training pass (on the branchless statistics:
under ``vmap`` a conditional would run every branch) over a ``(chunks, k, ...)``
view of ``x``, so masks, batch renormalization, ``axis_name`` (chunk ``i`` of every device
is combined) and the closed-form gradient all carry over unchanged; the running
state takes the stacked chunk moments in order, with a ``lax.scan`` (:func:`in_order`).
The chunks of one call are normalized in parallel, so with batch renormalization each
corrects towards the running statistics from before the call (as the devices of one
data-parallel step do), not towards those left by the chunks before it.
"""

from __future__ import annotations

import jax
from jax import lax

from bnjax._src.normalize import train_normalize
from bnjax._src.sharding import vary_like


def check_batch(virtual_batch_size: int, x_shape, reduce_axes) -> int:
    """The number of chunks of ``x``, after checking that axis 0 splits into them.

    Raises:
      ValueError: axis 0 is a feature axis, or its size is not a multiple of
        ``virtual_batch_size``.
    """
    if 0 not in reduce_axes:
        raise ValueError(
            f"virtual_batch_size={virtual_batch_size} splits axis 0 into virtual batches, "
            f"but axis 0 is a feature axis of x of shape {tuple(x_shape)}; expected the batch "
            "on axis 0"
        )
    if x_shape[0] % virtual_batch_size:
        raise ValueError(
            f"x has batch size {x_shape[0]} (shape {tuple(x_shape)}), not a multiple of "
            f"virtual_batch_size={virtual_batch_size}; expected a batch of n * "
            f"{virtual_batch_size}"
        )
    return x_shape[0] // virtual_batch_size


def _chunked(a, n):
    """``a`` viewed as ``(n, size // n, ...)`` along axis 0."""
    return a.reshape((n, a.shape[0] // n) + a.shape[1:])


def ghost_normalize(spec, x, params, mask, running, statistics, *, virtual_batch_size):
    """Normalizes every chunk of ``virtual_batch_size`` rows of ``x`` with its own statistics.

    Args:
      spec, params, running, statistics: as for ``normalize.train_normalize``.
      x: the input, batch on axis 0.
      mask: None, or a bool mask shaped by ``expand_mask`` (axis 0 of size 1 or the batch).
      virtual_batch_size: rows per chunk; must divide ``x.shape[0]``.

    Returns:
      ``(y, moments)``: ``y`` of the shape of ``x``, and ``Moments`` stacked over the
      chunks (a leading axis of size ``x.shape[0] // virtual_batch_size``).
    """
    n = x.shape[0] // virtual_batch_size
    mask_axis = None if mask is None or mask.shape[0] == 1 else 0
    chunk_mask = mask if mask_axis is None else _chunked(mask, n)

    def one(xc, mc):
        return train_normalize(spec, xc, params, mc, running, statistics)

    y, moments = jax.vmap(one, in_axes=(0, mask_axis))(_chunked(x, n), chunk_mask)
    return y.reshape(x.shape), moments


def in_order(state, moments, bn):
    """``state`` with each chunk's moments folded in, one chunk after another.

    Args:
      state: the state before this call (a ``BatchNormState`` or an accumulator).
      moments: ``Moments`` with a leading chunk axis, from :func:`ghost_normalize`.
      bn: the ``bnjax.BatchNorm`` whose settings the updates follow.

    Returns:
      The state after every chunk, as if each had been its own call.
    """
    # Under shard_map without axis_name the moments are per-device: so is the carry.
    state = jax.tree.map(lambda leaf: vary_like(leaf, moments.var), state)

    def step(carry, chunk):
        return carry.fold(chunk, bn), None

    state, _ = lax.scan(step, state, moments)
    return state
