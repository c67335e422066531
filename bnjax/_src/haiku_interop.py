"""Checkpoint conversion between bnjax and Haiku's ``hk.BatchNorm``.

Haiku keeps its statistics in keep-dims shape for its ``data_format`` (or ``axis``), and
its moving averages as zero-debiased EMAs: the raw EMA value ``hidden`` (which bnjax does
not keep), the debiased ``average`` and a ``counter``. ``from_haiku`` copies the averages,
counter and parameters bit for bit; ``to_haiku`` rebuilds ``hidden`` with Haiku's own
formula (see :func:`to_haiku` for the measured difference).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from bnjax._src import validation as v
from bnjax._src.interop import as_array, as_count, as_shaped, raw_average
from bnjax._src.presets import haiku_channel_index
from bnjax._src.types import BatchNormParams, BatchNormState


def _haiku_kept_axes(data_format, axis, ndim: int, what: str) -> tuple[int, ...]:
    """The axes an ``hk.BatchNorm`` keeps on an ``ndim``-D input (Haiku's ``axis`` reduces)."""
    if axis is None:
        if ndim < 1:
            raise ValueError(f"{what} has rank {ndim}; expected Haiku's keep-dims statistics")
        return (haiku_channel_index(data_format) % ndim,)
    reduced = (axis,) if isinstance(axis, int) else tuple(axis)
    if not all(isinstance(a, (int, np.integer)) and -ndim <= a < ndim for a in reduced):
        raise ValueError(f"axis={axis!r} is not a sequence of axes of a {ndim}-D input")
    return tuple(i for i in range(ndim) if i not in {a % ndim for a in reduced})


def from_haiku(params, state, name: str = "batch_norm", *, data_format="channels_last", axis=None):
    """Reads an ``hk.BatchNorm``'s entries from Haiku ``params`` and ``state``.

    Haiku keeps its statistics and parameters in keep-dims shape: ``(1, 1, 1, C)`` for
    ``"channels_last"``, ``(1, C, 1, 1)`` for ``"channels_first"``, the input's shape with
    1 on the reduced axes when ``axis`` is set. They are read as bnjax's feature shape:
    ``(C,)``, or the sizes of the kept axes.

    Args:
      params: Haiku params with ``{name: {"scale", "offset"}}`` (either may be absent).
      state: Haiku state with ``{name}/~/mean_ema`` and ``{name}/~/var_ema``, each
        ``{"counter", "hidden", "average"}``.
      name: the module's name in the Haiku tree.
      data_format: the module's ``data_format`` (``"channels_last"``, ``"channels_first"``,
        ``"NCHW"``, ...).
      axis: the module's ``axis`` (the reduced axes), or None.

    Returns:
      ``(params, state)`` for ``presets.haiku(...)`` with the same ``data_format``: the
      debiased ``average`` of each moving average, and its ``counter`` as ``count``.

    Raises:
      ValueError: a leaf's shape is not the keep-dims shape of that layout (size 1 on
        every reduced axis); e.g. ``data_format`` is not the module's.
    """
    p = params.get(name, {}) if params is not None else {}
    mean_ema, var_ema = state[f"{name}/~/mean_ema"], state[f"{name}/~/var_ema"]
    shape = np.shape(as_array(mean_ema["average"], "mean_ema.average"))
    kept = _haiku_kept_axes(data_format, axis, len(shape), "mean_ema.average")
    hk_shape = tuple(n if i in kept else 1 for i, n in enumerate(shape))
    meaning = (
        f"the statistics shape of an hk.BatchNorm with data_format={data_format!r}, "
        f"axis={axis!r}. Pass the module's data_format and axis"
    )

    def flat(value, what):
        """``value``, of Haiku's shape ``hk_shape``, in bnjax's feature shape (None stays)."""
        if value is None:
            return None
        return jnp.reshape(as_shaped(value, what, hk_shape, meaning), [shape[i] for i in kept])

    mean = flat(mean_ema["average"], "mean_ema.average")
    var = flat(var_ema["average"], "var_ema.average")
    count = as_count(mean_ema["counter"], "mean_ema.counter")
    params = BatchNormParams(flat(p.get("scale"), "scale"), flat(p.get("offset"), "offset"))
    return params, BatchNormState(mean, var, count)


@functools.partial(jax.jit, static_argnums=2)
def _haiku_average(hidden, counter, decay_rate: float):
    """``hk.ExponentialMovingAverage``'s debiased average, with Haiku's own (jitted) formula."""
    with jax.numpy_dtype_promotion("standard"):  # Haiku's formula mixes int and float
        decay = jax.lax.convert_element_type(decay_rate, hidden.dtype)
        return hidden / (jnp.ones([], hidden.dtype) - jnp.power(decay, counter))


def to_haiku(
    params,
    state,
    *,
    decay_rate: float,
    ndim: int,
    name: str = "batch_norm",
    data_format="channels_last",
    axis=None,
):
    """Haiku ``(params, state)`` trees for an ``hk.BatchNorm``.

    Args:
      params, state: the bnjax pytrees, leaves of the feature shape (``(C,)``).
      decay_rate: the Haiku module's decay, to rebuild the EMAs' raw ``hidden`` values,
        which bnjax does not keep: the value nearest ``average * (1 -
        decay_rate**counter)`` that Haiku's jitted debiasing maps back to ``average``
        exactly. Haiku's debiasing is not one-to-one, so this is within 1 ulp of the
        ``hidden`` Haiku had, not always equal. ``average`` and ``counter`` are exact.
      ndim: the rank of the module's input.
      name: the module's name in the Haiku tree.
      data_format: the module's ``data_format``: leaves get shape ``(1,) * (ndim - 1) +
        (C,)`` for ``"channels_last"``, ``(1, C) + (1,) * (ndim - 2)`` for
        ``"channels_first"``.
      axis: the module's ``axis`` (the reduced axes), or None.

    Returns:
      ``(hk_params, hk_state)``.

    Raises:
      TypeError: ``decay_rate`` is not a real number or ``ndim`` not an int.
      ValueError: ``decay_rate`` is outside [0, 1], ``ndim`` is not positive, or the
        feature shape does not fit the kept axes of that layout.
    """
    v.check_number("decay_rate", decay_rate, low=0.0, high=1.0)
    v.check_int("ndim", ndim, low=1, what="the input's rank, x.ndim")
    kept = _haiku_kept_axes(data_format, axis, ndim, "x")
    feature = tuple(np.shape(state.mean))
    if len(kept) != len(feature):
        raise ValueError(
            f"state.mean has shape {feature}; expected one size per kept axis {kept} of an "
            f"{ndim}-D input with data_format={data_format!r}, axis={axis!r}"
        )
    sizes = dict(zip(kept, feature, strict=True))
    shape = [sizes.get(i, 1) for i in range(ndim)]
    counter = np.asarray(state.count, np.int32)

    def ema(average):
        """Haiku's moving average of ``average``; its raw EMA is 0 before any update."""
        avg = np.reshape(np.array(average), shape)
        debias = functools.partial(_haiku_average, counter=counter, decay_rate=decay_rate)
        hidden = np.zeros_like(avg) if counter <= 0 else raw_average(avg, debias)
        return {"counter": counter, "hidden": hidden, "average": avg}

    leaves = (("scale", params.scale), ("offset", params.bias))
    p = {k: np.reshape(np.array(a), shape) for k, a in leaves if a is not None}
    hk_state = {f"{name}/~/mean_ema": ema(state.mean), f"{name}/~/var_ema": ema(state.var)}
    return ({name: p} if p else {}), hk_state
