"""Presets: the ``BatchNorm`` that behaves like another framework's batch norm.

Each function takes the framework's own argument names, defaults and conventions and
returns the equivalent :class:`bnjax.BatchNorm`, so a port reads like the original, and
a bad argument is reported under the framework's name for it:

* PyTorch's ``momentum`` is the weight of the *new* batch (0.1 there is 0.9 here),
  ``momentum=None`` is a cumulative average, the running variance is unbiased and the
  channel axis is 1.
* Keras and TF1 default to ``epsilon=1e-3``; TF1's fused kernel (4-D inputs only) stores
  the unbiased batch variance in its moving average.
* Haiku's ``decay_rate`` is a zero-debiased EMA.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import jax.numpy as jnp

from bnjax._src import validation as v
from bnjax._src.batchnorm import BatchNorm

# TF1's fused kernel: only for a single channel axis 1 or 3 of a 4-D input
# (``BatchNormalizationBase._raise_if_fused_cannot_be_used``), and with epsilon raised to
# cuDNN's minimum (``tf.nn.fused_batch_norm``).
_TF1_FUSED_AXES = (-3, -1, 1, 3)
_TF1_FUSED_MIN_EPSILON = 1.001e-5

# ``hk.get_channel_index``: the data formats Haiku accepts and their channel axis.
_HAIKU_CHANNELS_FIRST = re.compile(r"^NC[^C]*$")
_HAIKU_CHANNELS_LAST = re.compile(r"^N[^C]*C$|^((BT)|(TB))[^D]*D$")


def haiku_channel_index(data_format) -> int:
    """The channel axis (1 or -1) of a Haiku ``data_format``, as ``hk.get_channel_index``.

    Raises:
      ValueError: ``data_format`` is none of ``channels_first``, ``channels_last``, a
        spatial format (``NCHW``, ``NHWC``, ``N...C``, ...) or a sequential one (``BTHWD``).
    """
    if isinstance(data_format, str):
        if data_format == "channels_first" or _HAIKU_CHANNELS_FIRST.match(data_format):
            return 1
        if data_format == "channels_last" or _HAIKU_CHANNELS_LAST.match(data_format):
            return -1
    raise ValueError(
        f"data_format={data_format!r} is not supported; expected 'channels_last', "
        "'channels_first', or a Haiku layout string such as 'NHWC', 'NCHW' or 'N...C'"
    )


def torch(momentum: float | None = 0.1, eps: float = 1e-5, affine: bool = True) -> BatchNorm:
    """``torch.nn.BatchNorm1d/2d/3d(num_features, eps, momentum, affine)``.

    Channels on axis 1 (``(N, C)``, ``(N, C, L)``, ``(N, C, H, W)``, ...); running
    variance unbiased (``n / (n - 1)`` times the batch variance); ``state.count`` is
    ``num_batches_tracked``.

    Args:
      momentum: PyTorch's weight of the new batch, in [0, 1], or None for the cumulative
        average.
      eps: added to the variance; at least 0.
      affine: learn ``weight`` (scale) and ``bias``.

    Returns:
      The equivalent ``BatchNorm``.

    Raises:
      TypeError, ValueError: an argument of the wrong type or out of range, named as
        PyTorch names it.

    Example:
      >>> from bnjax import presets
      >>> presets.torch(momentum=0.1).momentum
      0.9
    """
    v.check_number("momentum", momentum, low=0.0, high=1.0, allow_none=True)
    v.check_number("eps", eps, low=0.0)
    v.check_bool("affine", affine)
    return BatchNorm(
        axis=1,
        momentum=0.0 if momentum is None else 1.0 - momentum,
        epsilon=eps,
        center=affine,
        scale=affine,
        averaging="cumulative" if momentum is None else "ema",
        running_var="unbiased",
    )


def keras(
    axis=-1, momentum: float = 0.99, epsilon: float = 1e-3, center=True, scale=True
) -> BatchNorm:
    """``keras.layers.BatchNormalization(axis, momentum, epsilon, center, scale)`` (Keras 3).

    Args:
      axis: the feature axis (or axes).
      momentum: decay of the old moving value, in [0, 1].
      epsilon: added to the variance; at least 0.
      center: learn ``beta``.
      scale: learn ``gamma``.

    Returns:
      The equivalent ``BatchNorm`` (biased moving variance, mean 0 / var 1 start).

    Raises:
      TypeError, ValueError: an argument of the wrong type or out of range.

    Example:
      >>> from bnjax import presets
      >>> presets.keras().epsilon
      0.001
    """
    return BatchNorm(axis=axis, momentum=momentum, epsilon=epsilon, center=center, scale=scale)


def tf1(
    axis=-1,
    momentum: float = 0.99,
    epsilon: float = 1e-3,
    center=True,
    scale=True,
    fused: bool | None = None,
    *,
    ndim: int | None = None,
) -> BatchNorm:
    """``tf.compat.v1.layers.batch_normalization(axis, momentum, epsilon, center, scale, fused)``.

    TF1 chooses its kernel when it first sees the input. With ``fused=None`` (its
    default) or ``fused=True`` it runs the fused kernel if the input is 4-D and ``axis``
    is a single axis 1 or 3 (``-1``, ``-3``), and silently falls back to the non-fused
    path otherwise. The two store different moving variances: the fused kernel the
    unbiased ``n / (n - 1)`` batch variance (and it raises ``epsilon`` to at least
    ``1.001e-5``), the non-fused path the biased one.

    A preset is built before it sees an input, so pass ``ndim=x.ndim`` and the kernel
    is resolved exactly as TF1 resolves it. Without ``ndim``, ``fused`` is taken
    literally: ``None`` or ``False`` is the non-fused path (what TF1 runs for every rank
    but 4), ``True`` the fused kernel.

    With bnjax, ``training`` is an argument of every ``apply``, and the state it returns
    *is* the update that TF1 puts in ``UPDATE_OPS``.

    Args:
      axis: the feature axis (or axes).
      momentum: decay of the old moving value, in [0, 1].
      epsilon: added to the variance; at least 0.
      center: learn ``beta``.
      scale: learn ``gamma``.
      fused: TF1's ``fused``: None (its default) or True to use the fused kernel where
        TF1 can, False never to use it.
      ndim: the rank of the layer's input (``x.ndim``), so the preset picks the kernel
        TF1 picks; None if unknown (see above).

    Returns:
      The equivalent ``BatchNorm``: ``running_var="unbiased"`` on the fused kernel,
      ``"biased"`` otherwise.

    Raises:
      TypeError: ``fused`` is not None or a bool, ``ndim`` not None or an int, or another
        argument of the wrong type.
      ValueError: ``ndim`` below 1, or another argument out of range.

    Example:
      >>> from bnjax import presets
      >>> presets.tf1(ndim=2).running_var   # TF1's non-fused path (also tf1())
      'biased'
      >>> presets.tf1(ndim=4).running_var   # TF1's fused kernel
      'unbiased'
    """
    if fused is not None:
        v.check_bool("fused", fused)
    v.check_int("ndim", ndim, low=1, allow_none=True, what="the input's rank, x.ndim")
    v.check_number("epsilon", epsilon, low=0.0)
    # TF1's test (BatchNormalizationV1.build): a single channel axis 1 or 3 of a 4-D input.
    axes = v.as_axes(axis)
    axes = (axes,) if isinstance(axes, int) else axes
    fusable = ndim == 4 and len(axes) == 1 and axes[0] in _TF1_FUSED_AXES
    # An unknown rank takes ``fused`` literally; a known one, as TF1 does (None: where it can).
    uses_fused = bool(fused) if ndim is None else fusable and fused in (None, True)
    return BatchNorm(
        axis=axis,
        momentum=momentum,
        epsilon=max(epsilon, _TF1_FUSED_MIN_EPSILON) if uses_fused else epsilon,
        center=center,
        scale=scale,
        running_var="unbiased" if uses_fused else "biased",
    )


def flax(
    axis=-1,
    momentum: float = 0.99,
    epsilon: float = 1e-5,
    *,
    use_bias=True,
    use_scale=True,
    axis_name=None,
    axis_index_groups=None,
    dtype=None,
    param_dtype=jnp.float32,
) -> BatchNorm:
    """``flax.linen.BatchNorm`` / ``flax.nnx.BatchNorm`` with the same argument names.

    Args:
      axis: the feature axis (or axes).
      momentum: decay of the old running value, in [0, 1].
      epsilon: added to the variance; at least 0.
      use_bias: learn ``bias``.
      use_scale: learn ``scale``.
      axis_name: named axis over which batch statistics are combined.
      axis_index_groups: groups of ``axis_name`` indices.
      dtype: output dtype (None keeps the input's).
      param_dtype: parameter dtype.

    Returns:
      The equivalent ``BatchNorm``.

    Raises:
      TypeError, ValueError: an argument of the wrong type or out of range.

    Example:
      >>> from bnjax import presets
      >>> presets.flax(momentum=0.9).momentum
      0.9
    """
    v.check_bool("use_bias", use_bias)
    v.check_bool("use_scale", use_scale)
    return BatchNorm(
        axis=axis,
        momentum=momentum,
        epsilon=epsilon,
        center=use_bias,
        scale=use_scale,
        axis_name=axis_name,
        axis_index_groups=axis_index_groups,
        dtype=dtype,
        param_dtype=param_dtype,
    )


def _haiku_cross_replica(axis, index_groups):
    """Haiku's ``cross_replica_axis`` (a name or a sequence of names) and
    ``cross_replica_axis_index_groups``, checked under those names."""
    if isinstance(axis, Sequence) and not isinstance(axis, str):
        axis = tuple(axis)
    try:
        hash(axis)
    except TypeError:
        raise TypeError(
            f"cross_replica_axis must be a name or a sequence of names; got {axis!r}"
        ) from None
    try:
        groups = v.as_groups(index_groups)
    except (TypeError, ValueError) as err:  # name Haiku's argument, not bnjax's
        raise type(err)(
            str(err).replace("axis_index_groups", "cross_replica_axis_index_groups", 1)
        ) from None
    if groups is not None and axis is None:
        raise ValueError(
            f"cross_replica_axis_index_groups={index_groups!r} is set but "
            "cross_replica_axis is None; expected both or neither"
        )
    return axis, groups


def haiku(
    decay_rate: float,
    eps: float = 1e-5,
    *,
    create_scale: bool,
    create_offset: bool,
    data_format: str = "channels_last",
    cross_replica_axis=None,
    cross_replica_axis_index_groups=None,
) -> BatchNorm:
    """``hk.BatchNorm(create_scale, create_offset, decay_rate, eps, ...)``.

    Haiku's moving averages are zero-debiased EMAs (``averaging="debiased"``): after the
    first batch they hold that batch's statistics exactly.

    Args:
      decay_rate: decay of the old moving value, in [0, 1].
      eps: added to the variance; at least 0.
      create_scale: learn ``scale``.
      create_offset: learn ``offset`` (bnjax's ``bias``).
      data_format: ``"channels_last"`` (axis -1), ``"channels_first"`` (axis 1), or a
        layout string Haiku accepts (``"NHWC"``, ``"NCHW"``, ``"N...C"``, ``"BTHWD"``, ...).
      cross_replica_axis: named axis (or a sequence of them) over which batch statistics
        are combined.
      cross_replica_axis_index_groups: groups of its indices.

    Returns:
      The equivalent ``BatchNorm``.

    Raises:
      TypeError, ValueError: an argument of the wrong type or out of range, named as
        Haiku names it.

    Example:
      >>> from bnjax import presets
      >>> presets.haiku(0.9, create_scale=True, create_offset=True).averaging
      'debiased'
    """
    v.check_number("decay_rate", decay_rate, low=0.0, high=1.0)
    v.check_number("eps", eps, low=0.0)
    v.check_bool("create_scale", create_scale)
    v.check_bool("create_offset", create_offset)
    replica_axis, groups = _haiku_cross_replica(cross_replica_axis, cross_replica_axis_index_groups)
    return BatchNorm(
        axis=haiku_channel_index(data_format),
        momentum=decay_rate,
        epsilon=eps,
        center=create_offset,
        scale=create_scale,
        averaging="debiased",
        axis_name=replica_axis,
        axis_index_groups=groups,
    )
