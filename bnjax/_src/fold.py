"""Folding an inference-mode BatchNorm into the linear layer before it.

In inference, batch norm is a per-feature affine map, ``z = y * a + (bias - mean * a)``
with ``a = scale / sqrt(var + epsilon)``. When ``y = x @ kernel + b`` (a Dense layer) or a
convolution, the map folds into the layer: ``kernel' = kernel * a`` along the output
features and ``b' = (b - mean) * a + bias``, so serving needs one layer instead of two.
Kernels use Flax layouts: Dense ``(in, out)``, Conv ``HWIO`` (spatial..., in, out); the
output features are the last kernel axis, which must be the BatchNorm's feature axis.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from bnjax._src.moments import accumulation_dtype


def _features(bn, state, kernel, kind: str) -> int:
    """Checks that ``bn`` normalizes one feature axis of the size of the kernel's output."""
    if isinstance(bn.axis, tuple) and len(bn.axis) != 1:
        raise ValueError(
            f"bn.axis={bn.axis!r} normalizes several axes; fold_into_{kind} needs one "
            "feature axis, the layer's output features"
        )
    kernel_shape = tuple(jnp.shape(kernel))
    out = kernel_shape[-1] if kernel_shape else None
    if kind == "dense" and len(kernel_shape) != 2:
        raise ValueError(f"kernel has shape {kernel_shape}; expected a Dense kernel (in, out)")
    if kind == "conv" and len(kernel_shape) < 3:
        raise ValueError(
            f"kernel has shape {kernel_shape}; expected a Conv kernel (spatial..., in, out)"
        )
    if tuple(jnp.shape(state.mean)) != (out,):
        raise ValueError(
            f"state.mean has shape {tuple(jnp.shape(state.mean))}; expected ({out},), the "
            f"output features of the kernel of shape {kernel_shape}"
        )
    return out


def _fold(bn, params, state, kernel, bias, kind: str):
    out = _features(bn, state, kernel, kind)
    kernel = jnp.asarray(kernel)
    # An integer kernel (int64 under x64 too) computes in float: at least float32.
    inexact = jnp.issubdtype(kernel.dtype, jnp.inexact)
    acc = accumulation_dtype(kernel.dtype if inexact else jnp.float32, state.var.dtype)
    a = lax.rsqrt(state.var.astype(acc) + jnp.asarray(bn.epsilon, acc))
    if bn.scale:
        a = a * params.scale.astype(acc)
    b = jnp.zeros((out,), acc) if bias is None else jnp.asarray(bias).astype(acc)
    if b.shape != (out,):
        raise ValueError(f"bias has shape {b.shape}; expected ({out},) or None")
    new_bias = (b - state.mean.astype(acc)) * a
    if bn.center:
        new_bias = new_bias + params.bias.astype(acc)
    # An integer kernel or bias (``jnp.arange(3)``) folds into floats: cast back to an
    # integer dtype, the folded values would be truncated.
    kernel_dtype = kernel.dtype if jnp.issubdtype(kernel.dtype, jnp.inexact) else acc
    bias_dtype = kernel_dtype if bias is None else jnp.result_type(bias)
    if not jnp.issubdtype(bias_dtype, jnp.inexact):
        bias_dtype = kernel_dtype
    return (kernel.astype(acc) * a).astype(kernel_dtype), new_bias.astype(bias_dtype)


def fold_into_dense(bn, params, state, kernel, bias=None):
    """Folds an inference-mode BatchNorm into the Dense layer before it.

    Args:
      bn: the ``BatchNorm`` config; its feature axis is the Dense output.
      params: its ``BatchNormParams``, each of shape (out,).
      state: its ``BatchNormState``, mean and var of shape (out,).
      kernel: the Dense kernel, shape (in, out).
      bias: the Dense bias, shape (out,), or None.

    Returns:
      ``(kernel, bias)``: shapes (in, out) and (out,), such that ``x @ kernel + bias``
      equals ``bn.apply(params, state, x @ kernel0 + bias0, training=False)[0]``.

    Raises:
      ValueError: the kernel is not 2-D, or the shapes of ``state`` or ``bias`` do not
        match its output features.

    Example:
      >>> import jax.numpy as jnp, bnjax
      >>> bn = bnjax.BatchNorm()
      >>> params, state = bn.init((1, 3))
      >>> kernel, bias = bnjax.fold_into_dense(bn, params, state, jnp.ones((2, 3)), None)
      >>> kernel.shape, bias.shape
      ((2, 3), (3,))
    """
    return _fold(bn, params, state, kernel, bias, "dense")


def fold_into_conv(bn, params, state, kernel, bias=None):
    """Folds an inference-mode BatchNorm into the convolution before it.

    Args:
      bn: the ``BatchNorm`` config, normalizing the channels-last conv output.
      params: its ``BatchNormParams``, each of shape (out,).
      state: its ``BatchNormState``, mean and var of shape (out,).
      kernel: the conv kernel in ``HWIO`` layout: spatial sizes, input channels (per
        group), output channels.
      bias: the conv bias, shape (out,), or None.

    Returns:
      ``(kernel, bias)`` of the same shapes (bias (out,)), such that the convolution with
      them equals the convolution followed by ``bn`` in inference mode.

    Raises:
      ValueError: the kernel has fewer than 3 dimensions, or the shapes of ``state`` or
        ``bias`` do not match its output channels.
    """
    return _fold(bn, params, state, kernel, bias, "conv")
