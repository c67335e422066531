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

# Each framework's names for (scale, bias, mean, var, count), in which its values are read
# and its errors reported.
_TORCH_NAMES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
_KERAS_NAMES = ("gamma", "beta", "moving_mean", "moving_variance", "count")
_FLAX_NAMES = ("scale", "bias", "mean", "var", "count")


def _numpy(value):
    """``value``, or a torch tensor as a numpy array without importing torch (exact values).

    Its bfloat16 and float8 dtypes, which ``Tensor.numpy()`` refuses (numpy has no such
    dtype) but jax has, go through float32: each is a subset of it, so the round trip is
    exact.
    """
    if not hasattr(value, "detach"):  # not a torch tensor
        return value
    tensor = value.detach().cpu()
    kind = str(tensor.dtype).removeprefix("torch.")
    if kind == "bfloat16" or kind.startswith("float8_"):
        return tensor.float().numpy().astype(jnp.dtype(kind))
    return tensor.numpy()


def as_array(value, name: str) -> jnp.ndarray:
    """A numpy array, torch tensor or jax array as a jax array (exact values)."""
    value = _numpy(value)
    try:
        return jnp.asarray(np.asarray(value))
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be an array; got {type(value).__name__}") from None


def as_shaped(value, name: str, shape: tuple[int, ...], meaning: str) -> jnp.ndarray:
    """``as_array(value, name)``, or a ValueError if its shape is not ``shape`` (what that
    shape is: ``meaning``)."""
    a = as_array(value, name)
    if a.shape != shape:
        raise ValueError(f"{name} has shape {a.shape}; expected {shape}, {meaning}")
    return a


def optional(value, name: str):
    """``as_array(value, name)``, or None for None (an absent scale or bias)."""
    return None if value is None else as_array(value, name)


def as_count(value, name: str) -> jnp.ndarray:
    count = np.asarray(_numpy(value))
    if count.shape != () or not np.issubdtype(count.dtype, np.integer):
        raise TypeError(f"{name} must be an integer scalar; got {value!r}")
    if count < 0:
        raise ValueError(f"{name} must be >= 0; got {int(count)}")
    # int32 holds 2**31 - 1 batches; a larger int64 count saturates there (it wrapped to
    # 0, and with momentum=None the next batch then replaced the statistics).
    return jnp.asarray(min(int(count), np.iinfo(np.int32).max), jnp.int32)


def as_pytrees(names, values) -> tuple[BatchNormParams, BatchNormState]:
    """``(params, state)`` from a framework's ``values`` of scale, bias, mean, var and count,
    each checked under the framework's name for it in ``names`` (scale and bias may be None).
    """
    scale, bias, mean, var, count = values
    n_scale, n_bias, n_mean, n_var, n_count = names
    params = BatchNormParams(optional(scale, n_scale), optional(bias, n_bias))
    state = BatchNormState(as_array(mean, n_mean), as_array(var, n_var), as_count(count, n_count))
    return params, state


def raw_average(average: np.ndarray, debias) -> np.ndarray:
    """The raw moving average that a framework's own (jitted) ``debias`` maps to ``average``.

    Debiasing (a division by ``1 - decay**counter``) is not one-to-one, so the raw value
    cannot always be recovered: this is the float nearest ``average / debias(1)`` that
    ``debias`` maps back to ``average`` bit for bit (within 2 ulps; else that quotient),
    within 1 ulp of the value the framework had.
    """
    inverse = np.float64(np.asarray(debias(np.ones((), average.dtype))))
    guess = (average.astype(np.float64) / inverse).astype(average.dtype)
    if average.dtype not in (np.float16, np.float32, np.float64):
        return guess
    down, up = np.nextafter(guess, -np.inf), np.nextafter(guess, np.inf)
    hidden = guess
    # The nearest candidate that fits wins (down before up): the last one written.
    for c in (np.nextafter(up, np.inf), np.nextafter(down, -np.inf), up, down, guess):
        hidden = np.where(np.asarray(debias(c)) == average, c, hidden)
    return hidden


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
    values = [sd.get(key) for key in _TORCH_NAMES[:4]]
    return as_pytrees(_TORCH_NAMES, [*values, 0 if count is None else count])


def to_torch(params: BatchNormParams, state: BatchNormState, prefix: str = "") -> dict:
    """A PyTorch BatchNorm ``state_dict`` of writable numpy arrays (``torch.from_numpy``-ready).

    Args:
      params: ``BatchNormParams``; ``None`` leaves are left out (``affine=False``).
      state: ``BatchNormState``.
      prefix: prepended to every key.

    Returns:
      ``{weight, bias, running_mean, running_var, num_batches_tracked}`` (int64 count).
    """
    values = (params.scale, params.bias, state.mean, state.var, np.array(state.count, np.int64))
    pairs = zip(_TORCH_NAMES, values, strict=True)
    return {prefix + k: np.array(a) for k, a in pairs if a is not None}


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
    gamma = weights.pop(0) if scale else None
    beta = weights.pop(0) if center else None
    return as_pytrees(_KERAS_NAMES, [gamma, beta, *weights, count])


def to_keras(params: BatchNormParams, state: BatchNormState) -> list:
    """``[gamma, beta, moving_mean, moving_variance]`` for ``layer.set_weights``.

    ``None`` parameters are left out, as Keras does for ``scale=False``/``center=False``.
    """
    out = [np.array(p) for p in (params.scale, params.bias) if p is not None]
    return out + [np.array(state.mean), np.array(state.var)]


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
        leaves = [getattr(variables, n, None) for n in _FLAX_NAMES[:4]]
        values = [None if a is None else a[...] for a in leaves]  # Flax's read of a Variable
    else:
        p, stats = _flax_layer(variables)
        values = [p.get("scale"), p.get("bias"), stats["mean"], stats["var"]]
    return as_pytrees(_FLAX_NAMES, [*values, count])


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
        layers = list(_flax_layers(stats))
        example = layers[0] if layers else "BatchNorm_0"
        path = "".join(f"[{part!r}]" for part in example.split("/"))
        raise ValueError(
            "variables['batch_stats'] has no 'mean' and 'var': these are the variables of "
            f"a whole model (BatchNorm layers: {layers}); convert one layer at a time, e.g. "
            f"from_flax({{'params': variables['params']{path}, "
            f"'batch_stats': variables['batch_stats']{path}}})"
        )
    return variables.get("params", {}), stats


def _flax_layers(stats, prefix=""):
    """The paths (``a/b``) of the dicts holding ``mean`` and ``var`` inside ``stats``."""
    for key, value in stats.items():
        if isinstance(value, Mapping) and {"mean", "var"} <= set(value):
            yield f"{prefix}{key}"
        elif isinstance(value, Mapping):
            yield from _flax_layers(value, f"{prefix}{key}/")


def to_flax(params: BatchNormParams, state: BatchNormState) -> dict:
    """Linen variables ``{"params": {"scale", "bias"}, "batch_stats": {"mean", "var"}}``."""
    p = {k: v for k, v in (("scale", params.scale), ("bias", params.bias)) if v is not None}
    return {"params": p, "batch_stats": {"mean": state.mean, "var": state.var}}
