"""Checkpoint conversion between bnjax and PyTorch, Keras, Haiku and Flax.

Every converter copies values bit for bit, so round trips are exact. The conversions
are of *storage*; each framework's *meaning* comes from the matching preset in
``bnjax.presets`` (PyTorch's running variance is unbiased, so ``presets.torch()`` keeps
it unbiased; Haiku's averages are zero-debiased, so ``presets.haiku(...)`` debiases).
Where a framework keeps no update count (Keras, Flax) the count is an argument.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

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


def from_haiku(params, state, name: str = "batch_norm"):
    """Reads an ``hk.BatchNorm``'s entries from Haiku ``params`` and ``state``.

    Args:
      params: Haiku params with ``{name: {"scale", "offset"}}`` (either may be absent),
        each of shape (1, ..., C).
      state: Haiku state with ``{name}/~/mean_ema`` and ``{name}/~/var_ema``, each
        ``{"counter", "hidden", "average"}``.
      name: the module's name in the Haiku tree.

    Returns:
      ``(params, state)`` for ``presets.haiku(...)``: the debiased ``average`` of each
      moving average, and its ``counter`` as ``count``.
    """
    p = params.get(name, {}) if params is not None else {}
    mean_ema, var_ema = state[f"{name}/~/mean_ema"], state[f"{name}/~/var_ema"]
    scale, offset = _maybe(p, "scale"), _maybe(p, "offset")
    c = mean_ema["average"].shape[-1:] if scale is None else scale.shape[-1:]

    def flat(a):
        return None if a is None else jnp.reshape(a, c)

    bn_state = BatchNormState(
        mean=flat(_array(mean_ema["average"], "mean_ema.average")),
        var=flat(_array(var_ema["average"], "var_ema.average")),
        count=_count(mean_ema["counter"], "mean_ema.counter"),
    )
    return BatchNormParams(scale=flat(scale), bias=flat(offset)), bn_state


def to_haiku(params, state, *, decay_rate: float, ndim: int, name: str = "batch_norm"):
    """Haiku ``(params, state)`` trees for an ``hk.BatchNorm`` on channels-last inputs.

    Args:
      params, state: the bnjax pytrees, leaves of shape (C,).
      decay_rate: the Haiku module's decay; rebuilds the EMAs' raw ``hidden`` values as
        ``average * (1 - decay_rate**counter)`` (the ``average`` is copied exactly).
      ndim: the rank of the layer's input; Haiku stores shape ``(1,) * (ndim - 1) + (C,)``.
      name: the module's name in the Haiku tree.

    Returns:
      ``(hk_params, hk_state)``.
    """
    shape = (1,) * (ndim - 1) + tuple(np.shape(state.mean))
    p = {
        k: np.reshape(np.array(a), shape)
        for k, a in (("scale", params.scale), ("offset", params.bias))
        if a is not None
    }
    counter = np.asarray(state.count, np.int32)
    debias = 1.0 - float(decay_rate) ** int(counter) if int(counter) > 0 else 0.0

    def ema(average):
        avg = np.reshape(np.array(average), shape)
        hidden = (avg.astype(np.float64) * debias).astype(avg.dtype)
        return {"counter": counter, "hidden": hidden, "average": avg}

    hk_state = {f"{name}/~/mean_ema": ema(state.mean), f"{name}/~/var_ema": ema(state.var)}
    return ({name: p} if p else {}), hk_state
