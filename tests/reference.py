"""numpy float64 references for the tests: batch statistics, the forward pass, running averages.

Everything here is written from the textbook definitions, independently of bnjax: a masked
mean and biased variance, ``(x - mean) / sqrt(var + eps) * scale + bias``, and the closed
forms of the three running averages.
"""

from __future__ import annotations

import numpy as np


def feature_axes(axis, ndim: int) -> tuple[int, ...]:
    """The sorted non-negative feature axes named by ``axis`` (an int or a tuple of ints)."""
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    return tuple(sorted(a % ndim for a in axes))


def reduce_axes(axis, ndim: int) -> tuple[int, ...]:
    """The axes that batch norm reduces: every axis that is not a feature axis."""
    feat = feature_axes(axis, ndim)
    return tuple(i for i in range(ndim) if i not in feat)


def full_mask(mask, x_shape, axis) -> np.ndarray:
    """Broadcasts a mask to the full shape of ``x``, by the one mask rule.

    Args:
      mask: None; a bool array of ``x``'s number of dimensions (numpy broadcasting); or of
        lower rank, placed on ``x``'s trailing axes (numpy), on its leading axes (one flag
        per example), or on the axes of ``x`` without its feature axes (one per reduced
        axis), whichever fits the shapes (the tests use unambiguous masks).
      x_shape: the shape of ``x``.
      axis: the feature axis or axes.

    Returns:
      A bool array of shape ``x_shape`` (all True when ``mask`` is None).
    """
    if mask is None:
        return np.ones(x_shape, bool)
    mask = np.asarray(mask, bool)
    k, ndim = mask.ndim, len(x_shape)
    if k != ndim:
        feat = feature_axes(axis, ndim)
        reduced = [i for i in range(ndim) if i not in feat]
        candidates = [list(range(ndim - k, ndim)), list(range(k))]
        if k == len(reduced):
            candidates.append(reduced)
        for axes in candidates:
            if all(m in (1, x_shape[a]) for m, a in zip(mask.shape, axes, strict=True)):
                shape = [1] * ndim
                for m, a in zip(mask.shape, axes, strict=True):
                    shape[a] = m
                mask = mask.reshape(shape)
                break
    return np.broadcast_to(mask, x_shape)


def moments(x, axis=-1, mask=None):
    """Count, mean and biased variance per feature, in float64.

    Args:
      x: the input, any shape.
      axis: the feature axis or axes.
      mask: optional mask (see :func:`full_mask`); masked-out values may be NaN.

    Returns:
      ``(n, mean, var)``, each of the feature shape (the shape of ``x`` along ``axis``).
      Features with no counted element get ``n = 0`` and NaN mean and variance.
    """
    x = np.asarray(x, np.float64)
    w = full_mask(mask, x.shape, axis)
    red = reduce_axes(axis, x.ndim)
    xz = np.where(w, x, 0.0)
    n = w.sum(axis=red, keepdims=True).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = xz.sum(axis=red, keepdims=True) / n
        var = (np.where(w, (x - mean) ** 2, 0.0)).sum(axis=red, keepdims=True) / n
    shape = tuple(x.shape[a] for a in feature_axes(axis, x.ndim))
    return n.reshape(shape), mean.reshape(shape), var.reshape(shape)


def keepdims(feature_array, x_shape, axis) -> np.ndarray:
    """Reshapes a feature-shaped array so it broadcasts against ``x``."""
    feat = feature_axes(axis, len(x_shape))
    shape = tuple(d if i in feat else 1 for i, d in enumerate(x_shape))
    return np.reshape(np.asarray(feature_array, np.float64), shape)


def normalize(x, mean, var, eps, scale=None, bias=None, axis=-1) -> np.ndarray:
    """``(x - mean) / sqrt(var + eps) * scale + bias`` in float64; feature-shaped statistics."""
    x = np.asarray(x, np.float64)
    k = lambda a: keepdims(a, x.shape, axis)  # noqa: E731
    y = (x - k(mean)) / np.sqrt(k(var) + eps)
    if scale is not None:
        y = y * k(scale)
    if bias is not None:
        y = y + k(bias)
    return y


def train_forward(x, eps, scale=None, bias=None, axis=-1, mask=None) -> np.ndarray:
    """Training-mode output: ``x`` normalized with its own (masked) batch statistics."""
    _, mean, var = moments(x, axis, mask)
    return normalize(x, mean, var, eps, scale, bias, axis)


def running_average(values, momentum: float, averaging: str, init) -> np.ndarray:
    """The closed form of a running average after batches ``b_1..b_t`` (``values``).

    * ``"ema"``: ``m^t * init + sum_i (1 - m) m^(t-i) b_i``.
    * ``"debiased"``: ``sum_i m^(t-i) b_i / sum_i m^(t-i)``.
    * ``"cumulative"``: ``mean_i b_i``.
    * ``"ema_from_first"``: ``m^(t-1) b_1 + sum_{i>1} (1 - m) m^(t-i) b_i``.

    Args:
      values: a sequence of ``t >= 1`` arrays of one shape.
      momentum: ``m`` in [0, 1].
      averaging: ``"ema"``, ``"debiased"``, ``"cumulative"`` or ``"ema_from_first"``.
      init: the starting value (used by ``"ema"`` only).

    Returns:
      The average, float64, of the shape of the values.
    """
    b = np.asarray(values, np.float64)
    t = b.shape[0]
    m = np.float64(momentum)
    powers = m ** np.arange(t - 1, -1, -1, dtype=np.float64)  # m^(t-i), i = 1..t
    powers = powers.reshape((t,) + (1,) * (b.ndim - 1))
    if averaging == "ema":
        return m**t * np.asarray(init, np.float64) + ((1 - m) * powers * b).sum(0)
    if averaging == "debiased":
        return (powers * b).sum(0) / powers.sum()
    if averaging == "cumulative":
        return b.mean(0)
    if averaging == "ema_from_first":
        return powers[0] * b[0] + ((1 - m) * powers[1:] * b[1:]).sum(0)
    raise ValueError(f"averaging={averaging!r}")


def running_stats(batches, *, momentum, averaging, running_var, axis=-1, masks=None):
    """Running mean and variance after training on ``batches`` from a fresh state (0, 1).

    Args:
      batches: a sequence of inputs, each with the same feature shape.
      momentum, averaging: as for ``bnjax.BatchNorm``.
      running_var: ``"biased"`` or ``"unbiased"`` (``n/(n-1)`` times the batch variance,
        with ``n`` counted after masking).
      axis: the feature axis or axes.
      masks: None, or one mask (or None) per batch.

    Returns:
      ``(mean, var)``, float64 arrays of the feature shape.
    """
    masks = [None] * len(batches) if masks is None else masks
    means, variances = [], []
    for x, mask in zip(batches, masks, strict=True):
        n, mean, var = moments(x, axis, mask)
        if running_var == "unbiased":
            var = var * n / (n - 1)
        means.append(mean)
        variances.append(var)
    shape = means[0].shape
    mean = running_average(means, momentum, averaging, np.zeros(shape))
    var = running_average(variances, momentum, averaging, np.ones(shape))
    return mean, var
