"""Checkpoint conversion between bnjax and PyTorch, Keras, Haiku and Flax.

Every converter copies values bit for bit, so round trips are exact, with one exception:
Haiku's raw EMA values (``hidden``), which bnjax does not keep, are rebuilt by
``to_haiku`` to within 1 ulp. The conversions are of *storage*; each framework's
*meaning* comes from the matching preset in ``bnjax.presets`` (PyTorch's running variance
is unbiased, so ``presets.torch()`` keeps it unbiased; Haiku's averages are zero-debiased,
so ``presets.haiku(...)`` debiases). Where a framework keeps no update count (Keras,
Flax) the count is an argument.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from bnjax._src.presets import haiku_channel_index
from bnjax._src.types import BatchNormParams, BatchNormState

# torch dtypes that ``Tensor.numpy()`` refuses (numpy has no such dtype) but jax has; each
# is a subset of float32, so widening to float32 and narrowing back is exact.
_TORCH_ONLY_FLOATS = (
    "bfloat16",
    "float8_e4m3fn",
    "float8_e4m3fnuz",
    "float8_e5m2",
    "float8_e5m2fnuz",
)


def _torch_numpy(tensor):
    """A torch tensor as a numpy array, without importing torch (exact values)."""
    tensor = tensor.detach().cpu()
    kind = str(tensor.dtype).removeprefix("torch.")
    if kind in _TORCH_ONLY_FLOATS:
        return tensor.float().numpy().astype(jnp.dtype(kind))
    return tensor.numpy()


def _array(value, name: str, dtype=None) -> jnp.ndarray:
    """A numpy array, torch tensor or jax array as a jax array (exact values)."""
    if hasattr(value, "detach"):  # a torch tensor
        value = _torch_numpy(value)
    try:
        out = jnp.asarray(np.asarray(value))
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be an array; got {type(value).__name__}") from None
    return out if dtype is None else out.astype(dtype)


def _count(value, name: str) -> jnp.ndarray:
    count = np.asarray(_torch_numpy(value) if hasattr(value, "detach") else value)
    if count.shape != () or not np.issubdtype(count.dtype, np.integer):
        raise TypeError(f"{name} must be an integer scalar; got {value!r}")
    return jnp.asarray(count, jnp.int32)


def _maybe(d, key):
    value = d.get(key)
    return None if value is None else _array(value, key)


def from_torch(state_dict, prefix: str = "") -> tuple[BatchNormParams, BatchNormState]:
    """Reads a PyTorch BatchNorm's ``state_dict`` (tensors or numpy arrays).

    Args:
      state_dict: a mapping with ``{prefix}running_mean``, ``running_var``,
        ``num_batches_tracked`` and, if affine, ``weight`` and ``bias``; each of shape
        (C,) (``num_batches_tracked`` a scalar).
      prefix: the key prefix of the layer in a whole model's state dict, e.g. ``"bn1."``.

    Returns:
      ``(params, state)`` for ``presets.torch(...)``; ``scale``/``bias`` None if absent.

    Raises:
      KeyError: a running statistic is missing.
      TypeError: a value is not an array or the count is not an integer scalar.
    """
    sd = {k[len(prefix) :]: val for k, val in state_dict.items() if k.startswith(prefix)}
    for key in ("running_mean", "running_var"):
        if key not in sd:
            raise KeyError(f"state_dict has no {prefix}{key!s}; keys are {sorted(state_dict)}")
    count = sd.get("num_batches_tracked")
    params = BatchNormParams(scale=_maybe(sd, "weight"), bias=_maybe(sd, "bias"))
    state = BatchNormState(
        mean=_array(sd["running_mean"], "running_mean"),
        var=_array(sd["running_var"], "running_var"),
        count=jnp.zeros((), jnp.int32) if count is None else _count(count, "num_batches_tracked"),
    )
    return params, state


def to_torch(params: BatchNormParams, state: BatchNormState, prefix: str = "") -> dict:
    """A PyTorch BatchNorm ``state_dict`` of writable numpy arrays (``torch.from_numpy``-ready).

    Args:
      params: ``BatchNormParams``; ``None`` leaves are left out (``affine=False``).
      state: ``BatchNormState``.
      prefix: prepended to every key.

    Returns:
      ``{weight, bias, running_mean, running_var, num_batches_tracked}`` (int64 count).
    """
    out = {}
    if params.scale is not None:
        out["weight"] = np.array(params.scale)
    if params.bias is not None:
        out["bias"] = np.array(params.bias)
    out["running_mean"] = np.array(state.mean)
    out["running_var"] = np.array(state.var)
    out["num_batches_tracked"] = np.array(state.count, np.int64)
    return {prefix + k: val for k, val in out.items()}


def from_keras(weights, *, center: bool = True, scale: bool = True, count=0):
    """Reads ``layer.get_weights()`` of a Keras ``BatchNormalization``.

    Args:
      weights: ``[gamma, beta, moving_mean, moving_variance]``, without ``gamma`` when
        ``scale=False`` and without ``beta`` when ``center=False``; each of shape (C,).
      center, scale: the layer's settings.
      count: Keras keeps no update count; the ``state.count`` to use.

    Returns:
      ``(params, state)`` for ``presets.keras(...)``.

    Raises:
      ValueError: ``weights`` does not have ``2 + center + scale`` entries.
    """
    weights = list(weights)
    expected = 2 + int(center) + int(scale)
    if len(weights) != expected:
        raise ValueError(
            f"weights has {len(weights)} arrays; expected {expected} "
            f"([gamma] [beta] moving_mean moving_variance with center={center}, scale={scale})"
        )
    gamma = _array(weights.pop(0), "gamma") if scale else None
    beta = _array(weights.pop(0), "beta") if center else None
    state = BatchNormState(
        mean=_array(weights[0], "moving_mean"),
        var=_array(weights[1], "moving_variance"),
        count=_count(count, "count"),
    )
    return BatchNormParams(scale=gamma, bias=beta), state


def to_keras(params: BatchNormParams, state: BatchNormState) -> list:
    """``[gamma, beta, moving_mean, moving_variance]`` for ``layer.set_weights``.

    ``None`` parameters are left out, as Keras does for ``scale=False``/``center=False``.
    """
    out = [np.array(p) for p in (params.scale, params.bias) if p is not None]
    return out + [np.array(state.mean), np.array(state.var)]


def _nnx_value(variable):
    """The array held by an nnx Variable (``get_value`` in recent Flax, else ``.value``)."""
    if variable is None:
        return None
    get = getattr(variable, "get_value", None)
    return get() if callable(get) else variable.value


def from_flax(variables, *, count=0):
    """Reads Flax BatchNorm variables: linen ``{"params", "batch_stats"}`` or an nnx module.

    Args:
      variables: linen ``{"params": {"scale", "bias"}, "batch_stats": {"mean", "var"}}``
        of one BatchNorm (absent params are None), or an ``nnx.BatchNorm``.
      count: Flax keeps no update count; the ``state.count`` to use.

    Returns:
      ``(params, state)`` for ``presets.flax(...)``.
    """
    if hasattr(variables, "mean") and hasattr(variables, "var"):  # nnx.BatchNorm
        leaves = {
            n: _nnx_value(getattr(variables, n, None)) for n in ("scale", "bias", "mean", "var")
        }
        p, s = leaves, leaves
    else:
        p, s = variables.get("params", {}), variables["batch_stats"]
    params = BatchNormParams(scale=_maybe(p, "scale"), bias=_maybe(p, "bias"))
    state = BatchNormState(
        mean=_array(s["mean"], "mean"), var=_array(s["var"], "var"), count=_count(count, "count")
    )
    return params, state


def to_flax(params: BatchNormParams, state: BatchNormState) -> dict:
    """Linen variables ``{"params": {"scale", "bias"}, "batch_stats": {"mean", "var"}}``."""
    p = {k: v for k, v in (("scale", params.scale), ("bias", params.bias)) if v is not None}
    return {"params": p, "batch_stats": {"mean": state.mean, "var": state.var}}


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
    mean = _array(mean_ema["average"], "mean_ema.average")
    kept = _haiku_kept_axes(data_format, axis, mean.ndim, "mean_ema.average")
    hk_shape = tuple(n if i in kept else 1 for i, n in enumerate(mean.shape))

    def flat(a, what):
        if a is None:
            return None
        if a.shape != hk_shape:
            raise ValueError(
                f"{what} has shape {a.shape}; expected {hk_shape}, the statistics shape of an "
                f"hk.BatchNorm with data_format={data_format!r}, axis={axis!r}. Pass the "
                "module's data_format and axis"
            )
        return jnp.reshape(a, tuple(a.shape[i] for i in kept))

    bn_state = BatchNormState(
        mean=flat(mean, "mean_ema.average"),
        var=flat(_array(var_ema["average"], "var_ema.average"), "var_ema.average"),
        count=_count(mean_ema["counter"], "mean_ema.counter"),
    )
    params = BatchNormParams(
        scale=flat(_maybe(p, "scale"), "scale"), bias=flat(_maybe(p, "offset"), "offset")
    )
    return params, bn_state


@functools.partial(jax.jit, static_argnums=2)
def _haiku_average(hidden, counter, decay_rate: float):
    """``hk.ExponentialMovingAverage``'s debiased average, with Haiku's own (jitted) formula."""
    decay = jax.lax.convert_element_type(decay_rate, hidden.dtype)
    return hidden / (jnp.ones([], hidden.dtype) - jnp.power(decay, counter))


def _haiku_hidden(average: np.ndarray, counter: np.ndarray, decay_rate: float) -> np.ndarray:
    """The raw EMA value ``hidden`` that Haiku debiases into ``average``.

    Haiku's debiasing ``hidden / (1 - decay**counter)`` (float32) is not one-to-one, so
    ``hidden`` cannot always be recovered: this returns the float nearest
    ``average * (1 - decay**counter)`` that Haiku's jitted formula maps back to
    ``average`` bit for bit (within 2 ulps; else that product).
    """
    if int(counter) <= 0:
        return np.zeros_like(average)
    with jax.numpy_dtype_promotion("standard"):  # Haiku's formula mixes int and float
        inverse = _haiku_average(np.ones((), average.dtype), counter, decay_rate)
    guess = (average.astype(np.float64) / np.float64(inverse)).astype(average.dtype)
    if average.dtype not in (np.float16, np.float32, np.float64):
        return guess
    down = np.nextafter(guess, -np.inf)
    up = np.nextafter(guess, np.inf)
    candidates = [guess, down, up, np.nextafter(down, -np.inf), np.nextafter(up, np.inf)]
    hidden, found = guess, np.zeros(average.shape, bool)
    for c in candidates:
        with jax.numpy_dtype_promotion("standard"):
            ok = ~found & (np.asarray(_haiku_average(c, counter, decay_rate)) == average)
        hidden, found = np.where(ok, c, hidden), found | ok
    return hidden


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
      ValueError: ``ndim`` is not a positive int, or the feature shape does not fit the
        kept axes of that layout.
    """
    if isinstance(ndim, bool) or not isinstance(ndim, int) or ndim < 1:
        raise ValueError(f"ndim={ndim!r} is not a rank; expected the input's ndim, >= 1")
    kept = _haiku_kept_axes(data_format, axis, ndim, "x")
    feature = tuple(np.shape(state.mean))
    if len(kept) != len(feature):
        raise ValueError(
            f"state.mean has shape {feature}; expected one size per kept axis {kept} of an "
            f"{ndim}-D input with data_format={data_format!r}, axis={axis!r}"
        )
    shape = [1] * ndim
    for i, n in zip(kept, feature, strict=True):
        shape[i] = n
    p = {
        k: np.reshape(np.array(a), shape)
        for k, a in (("scale", params.scale), ("offset", params.bias))
        if a is not None
    }
    counter = np.asarray(state.count, np.int32)

    def ema(average):
        avg = np.reshape(np.array(average), shape)
        return {
            "counter": counter,
            "hidden": _haiku_hidden(avg, counter, decay_rate),
            "average": avg,
        }

    hk_state = {f"{name}/~/mean_ema": ema(state.mean), f"{name}/~/var_ema": ema(state.var)}
    return ({name: p} if p else {}), hk_state
