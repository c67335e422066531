"""The implementation of :mod:`bnjax.nnx` (the module docstring there says what it is)."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp

from bnjax._src import extras

try:
    from flax import nnx
    from flax.nnx.nn import dtypes, initializers
except ImportError as e:
    raise extras.missing("bnjax.nnx", "flax", e) from e

from bnjax._src import flax_common as common
from bnjax._src import validation as v
from bnjax._src.types import BatchNormState

_ZEROS = initializers.zeros_init()
_ONES = initializers.ones_init()

_NO_MODE = (
    "use_running_average is None both in the BatchNorm constructor and in the call; pass "
    "use_running_average=True/False to either, or call model.train() / model.eval()"
)


class BatchNorm(nnx.Module):
    """Batch normalization with Flax NNX's interface and variables, and bnjax's numerics.

    Accepts every constructor and call argument of ``flax.nnx.BatchNorm`` with the same
    meaning and default, plus bnjax's options as keywords (``**options``), with the names
    and defaults of :class:`bnjax.BatchNorm`; each is kept as an attribute.
    ``use_fast_variance`` is accepted for compatibility and does not change the numbers:
    bnjax's variance is always the exact two-pass one, and statistics are always reduced
    in at least float32.

    The batch count is stored as an ``nnx.BatchStat`` named ``count`` only when a setting
    reads it (``averaging="debiased"`` or ``"cumulative"``, ``renorm``, ``checks``);
    otherwise ``count`` is None and the state is exactly Flax's. A Flax state loaded into
    a module that stores a count leaves the count at its value (0 when fresh): with
    ``"debiased"`` the next training batch then replaces the loaded statistics. With
    ``checks=True``, inference on statistics with a count of 0 reports them as never updated
    only when they are still exactly at init (mean 0, var 1), so a loaded Flax state passes.

    Args:
      num_features: the size of the feature axis (a tuple for several feature axes).
      use_running_average: True normalizes with the stored statistics; False with the
        batch's (and updates the stored ones); None requires it at call time.
      axis: feature axis or tuple of axes; every other axis is reduced.
      momentum: decay of the old running value.
      epsilon: added to the variance.
      dtype: output dtype; None gives the promotion of the input and the variables.
      param_dtype: dtype of ``scale`` and ``bias``.
      use_bias, use_scale: learn ``bias`` / ``scale``.
      bias_init, scale_init: initializers ``(key, shape, dtype)``.
      axis_name: named axis over which batch statistics combine.
      axis_index_groups: groups of ``axis_name`` indices.
      use_fast_variance: accepted; see above.
      promote_dtype: Flax's dtype promotion of ``(x, mean, var, scale, bias)``; the
        promoted input and parameters are what the core normalizes with, while the
        running statistics are read and updated in their stored dtype.
      rngs: an ``nnx.Rngs``; ``rngs.params()`` feeds the initializers.
      bias_metadata, scale_metadata: metadata of the ``nnx.Param`` variables.
      **options: bnjax's options, any of ``averaging``, ``running_var``,
        ``skip_nonfinite``, ``checks``, ``renorm``, ``virtual_batch_size`` and
        ``statistics``; see :class:`bnjax.BatchNorm`.

    Raises:
      TypeError, ValueError: an argument is invalid, or an option is not bnjax's; the
        message names it.

    Example:
      >>> import jax.numpy as jnp, bnjax.nnx
      >>> from flax import nnx
      >>> bn = bnjax.nnx.BatchNorm(3, rngs=nnx.Rngs(0))
      >>> y = bn(jnp.arange(12.0).reshape(4, 3))  # training: statistics updated
      >>> bn.eval()
      >>> y = bn(jnp.arange(12.0).reshape(4, 3))  # running statistics
    """

    def __init__(
        self,
        num_features: int | tuple[int, ...],
        *,
        use_running_average: bool | None = False,
        axis: int | tuple[int, ...] = -1,
        momentum: float = 0.99,
        epsilon: float = 1e-5,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Any = _ZEROS,
        scale_init: Any = _ONES,
        axis_name: Any = None,
        axis_index_groups: Any = None,
        use_fast_variance: bool = True,
        promote_dtype: Any = dtypes.promote_dtype,
        rngs: nnx.Rngs,
        bias_metadata: Mapping[str, Any] = MappingProxyType({}),
        scale_metadata: Mapping[str, Any] = MappingProxyType({}),
        **options: Any,
    ):
        self.num_features = num_features
        self.use_running_average = use_running_average
        self.axis = axis
        self.momentum = momentum
        self.epsilon = epsilon
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.use_bias = use_bias
        self.use_scale = use_scale
        self.axis_name = axis_name
        self.axis_index_groups = axis_index_groups
        self.use_fast_variance = use_fast_variance
        self.promote_dtype = promote_dtype
        for name, default in common.OPTIONS.items():
            setattr(self, name, options.pop(name, default))
        if options:
            raise TypeError(
                f"BatchNorm got unexpected keyword argument(s) {sorted(options)}; expected "
                f"Flax's arguments or bnjax's options {list(common.OPTIONS)}"
            )
        core = common.core_config(self, dtype, axis_name)  # validates every setting
        shape = _feature_shape(num_features)
        self.mean = nnx.BatchStat(jnp.zeros(shape, jnp.float32))
        self.var = nnx.BatchStat(jnp.ones(shape, jnp.float32))
        self.count = nnx.BatchStat(jnp.zeros((), jnp.int32)) if common.needs_count(core) else None
        self.scale = nnx.data(None)
        if use_scale:
            self.scale = nnx.Param(scale_init(rngs.params(), shape, param_dtype), **scale_metadata)
        self.bias = nnx.data(None)
        if use_bias:
            self.bias = nnx.Param(bias_init(rngs.params(), shape, param_dtype), **bias_metadata)

    def __call__(self, x, use_running_average=None, *, mask=None, update_stats=None):
        """Normalizes ``x``; in training, updates the stored statistics.

        Args:
          x: array of any shape with the feature axes of ``axis``; integer and bool
            inputs are promoted by ``promote_dtype`` (to float32 by default), as in Flax.
          use_running_average: overrides the attribute when not None.
          mask: optional array (nonzero counts) read as in the core: Flax's numpy
            broadcasting, plus one flag per example (``(N,)`` for any rank of ``x``); a
            lower-rank mask that fits two ways (``(4,)`` against ``(4, 4)``) is refused.
            False (zero) entries are left out of the statistics.
          update_stats: bnjax's option: average this batch into the stored statistics;
            defaults to ``not use_running_average``.

        Returns:
          The normalized ``x``, same shape, in the dtype chosen by ``promote_dtype``.

        Raises:
          ValueError: ``use_running_average`` is None here and in the constructor.
          TypeError: a mode argument is not a Python bool.
          ValueError: a setting that reads the batch count was set after construction.
          ValueError: ``mask`` does not broadcast to ``x``.
        """
        if use_running_average is None:
            use_running_average = self.use_running_average
        if use_running_average is None:
            raise ValueError(_NO_MODE)
        training, update = common.modes(use_running_average, update_stats)
        variables = (self.scale, self.bias, self.mean, self.var, self.count)
        scale, bias, mean, var, count = (None if a is None else a[...] for a in variables)
        with jax.numpy_dtype_promotion("standard"):  # Flax's promotion, also in strict mode
            x, _, _, scale, bias = self.promote_dtype((x, mean, var, scale, bias), dtype=self.dtype)
        v.check_input(x)  # integers were promoted to float; complex inputs are refused
        # The output has ``dtype`` when given, whatever the promotion returned (as in Flax).
        out_dtype = x.dtype if self.dtype is None else self.dtype
        core = common.core_config(self, out_dtype, self.axis_name)
        if self.count is None and common.needs_count(core):
            raise ValueError(
                f"averaging={self.averaging!r} (or renorm/checks) reads the batch count, but "
                "this BatchNorm was built without one; build it with these settings instead "
                "of setting them afterwards"
            )
        stats = BatchNormState(mean, var, count)
        y, new = common.run(
            core, scale, bias, stats, x, training=training, update_stats=update, mask=mask
        )
        if update:
            self.mean[...] = new.mean
            self.var[...] = new.var
            if self.count is not None:
                self.count[...] = new.count
        return y

    def set_view(self, use_running_average: bool | None = None):
        """Used by ``nnx.view`` (and described by ``nnx.view_info``).

        Args:
          use_running_average: if True, the stored batch statistics will be used instead
            of computing the batch statistics on the input; None leaves it unchanged.
        """
        if use_running_average is not None:
            self.use_running_average = use_running_average


def _feature_shape(num_features) -> tuple[int, ...]:
    items = num_features if isinstance(num_features, (tuple, list)) else (num_features,)
    if not items:
        raise TypeError(f"num_features must be an int or a tuple of ints; got {num_features!r}")
    for n in items:
        v.check_int("num_features", n, low=1, what="the size of the feature axis")
    return tuple(items)
