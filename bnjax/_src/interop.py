"""Checkpoint conversion between bnjax and PyTorch, Keras and Flax (Haiku: haiku_interop.py).

Every converter copies values bit for bit, so round trips are exact, with one exception:
Haiku's raw EMA values (``hidden``), which bnjax does not keep, are rebuilt by
``to_haiku`` to within 1 ulp. The conversions are of *storage*; each framework's
*meaning* comes from the matching preset in ``bnjax.presets`` (PyTorch's running variance
is unbiased, so ``presets.torch()`` keeps it unbiased; Haiku's averages are zero-debiased,
so ``presets.haiku(...)`` debiases). Where a framework keeps no update count (Keras,
Flax) the count is an argument.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np

from bnjax._src import validation as v
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


def as_array(value, name: str, dtype=None) -> jnp.ndarray:
    """A numpy array, torch tensor or jax array as a jax array (exact values)."""
    if hasattr(value, "detach"):  # a torch tensor
        value = _torch_numpy(value)
    try:
        out = jnp.asarray(np.asarray(value))
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be an array; got {type(value).__name__}") from None
    return out if dtype is None else out.astype(dtype)


def as_count(value, name: str) -> jnp.ndarray:
    count = np.asarray(_torch_numpy(value) if hasattr(value, "detach") else value)
    if count.shape != () or not np.issubdtype(count.dtype, np.integer):
        raise TypeError(f"{name} must be an integer scalar; got {value!r}")
    if count < 0:
        raise ValueError(f"{name} must be >= 0; got {int(count)}")
    # int32 holds 2**31 - 1 batches; a larger int64 count saturates there (it wrapped to
    # 0, and with momentum=None the next batch then replaced the statistics).
    return jnp.asarray(min(int(count), np.iinfo(np.int32).max), jnp.int32)


def optional(d, key):
    value = d.get(key)
    return None if value is None else as_array(value, key)


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
    params = BatchNormParams(scale=optional(sd, "weight"), bias=optional(sd, "bias"))
    state = BatchNormState(
        mean=as_array(sd["running_mean"], "running_mean"),
        var=as_array(sd["running_var"], "running_var"),
        count=jnp.zeros((), jnp.int32) if count is None else as_count(count, "num_batches_tracked"),
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
      TypeError: ``center`` or ``scale`` is not a bool.
      ValueError: ``weights`` does not have ``2 + center + scale`` entries.
    """
    v.check_bool("center", center)
    v.check_bool("scale", scale)
    weights = list(weights)
    expected = 2 + int(center) + int(scale)
    if len(weights) != expected:
        raise ValueError(
            f"weights has {len(weights)} arrays; expected {expected} "
            f"([gamma] [beta] moving_mean moving_variance with center={center}, scale={scale})"
        )
    gamma = as_array(weights.pop(0), "gamma") if scale else None
    beta = as_array(weights.pop(0), "beta") if center else None
    state = BatchNormState(
        mean=as_array(weights[0], "moving_mean"),
        var=as_array(weights[1], "moving_variance"),
        count=as_count(count, "count"),
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
        p, s = _flax_layer(variables)
    params = BatchNormParams(scale=optional(p, "scale"), bias=optional(p, "bias"))
    state = BatchNormState(
        mean=as_array(s["mean"], "mean"),
        var=as_array(s["var"], "var"),
        count=as_count(count, "count"),
    )
    return params, state


def _flax_layer(variables):
    """The ``params`` and ``batch_stats`` dicts of one linen BatchNorm, or a ValueError
    that lists the layers of a whole model's variables."""
    if not isinstance(variables, Mapping) or "batch_stats" not in variables:
        keys = sorted(map(str, variables)) if isinstance(variables, Mapping) else None
        raise ValueError(
            "variables must hold one BatchNorm's 'batch_stats' (and 'params'); got "
            f"{type(variables).__name__}" + (f" with keys {keys}" if keys is not None else "")
        )
    stats = variables["batch_stats"]
    if isinstance(stats, Mapping) and not {"mean", "var"} <= set(stats):
        layers = _flax_layers(stats)
        example = layers[0] if layers else "BatchNorm_0"
        path = "".join(f"[{part!r}]" for part in example.split("/"))
        raise ValueError(
            "variables['batch_stats'] has no 'mean' and 'var': these are the variables of "
            f"a whole model (BatchNorm layers: {layers}); convert one layer at a time, e.g. "
            f"from_flax({{'params': variables['params']{path}, "
            f"'batch_stats': variables['batch_stats']{path}}})"
        )
    return variables.get("params", {}), stats


def _flax_layers(stats, prefix="") -> list[str]:
    """The paths (``a/b``) of the dicts holding ``mean`` and ``var`` inside ``stats``."""
    found = []
    for key, value in stats.items():
        if isinstance(value, Mapping):
            if {"mean", "var"} <= set(value):
                found.append(f"{prefix}{key}")
            else:
                found += _flax_layers(value, f"{prefix}{key}/")
    return found


def to_flax(params: BatchNormParams, state: BatchNormState) -> dict:
    """Linen variables ``{"params": {"scale", "bias"}, "batch_stats": {"mean", "var"}}``."""
    p = {k: v for k, v in (("scale", params.scale), ("bias", params.bias)) if v is not None}
    return {"params": p, "batch_stats": {"mean": state.mean, "var": state.var}}
