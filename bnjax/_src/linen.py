"""The implementation of :mod:`bnjax.linen` (the module docstring there says what it is)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax.nn import initializers

from bnjax._src import extras

try:
    import flax.linen as nn
    from flax.linen import dtypes
except ImportError as e:
    raise extras.missing("bnjax.linen", "flax", e) from e

from bnjax._src import flax_common as common
from bnjax._src import marks
from bnjax._src import validation as v
from bnjax._src.types import BatchNormState

# bnjax's options (``flax_common.OPTIONS``) as keyword-only fields, generated from the
# core's own: after Flax's fields, so that the positional order stays Flax's.
_Options = type(
    "_Options",
    (nn.Module,),
    {"__annotations__": dict.fromkeys(common.OPTIONS, Any), **common.OPTIONS},
    kw_only=True,
)


class BatchNorm(_Options):
    """Batch normalization with Flax linen's interface and variables, and bnjax's numerics.

    Accepts every attribute and call argument of ``flax.linen.BatchNorm`` with the same
    meaning, default and positional order, plus bnjax's options, keyword-only, with the
    names and defaults of :class:`bnjax.BatchNorm`. ``use_fast_variance`` and
    ``force_float32_reductions`` are accepted for compatibility and do not change the
    numbers: bnjax's variance is always the exact two-pass one (the fast
    ``E[x^2] - E[x]^2`` loses everything on data whose mean is large against its spread),
    and statistics are always reduced in at least float32. ``force_float32_reductions=False``
    still stores ``batch_stats`` in ``param_dtype``, as Flax does.

    The batch count is stored as ``batch_stats/count`` only when a setting reads it
    (``averaging="debiased"`` or ``"cumulative"``, ``renorm``, ``checks=True``). Variables
    without it (Flax's own) count as 0 batches: with ``"debiased"`` the next training
    batch replaces the stored statistics, with ``"cumulative"`` it starts a new mean. With
    ``checks=True``, inference on statistics without a count (or with a count of 0) reports
    them as never updated only when they are still exactly at init (mean 0, var 1).

    Attributes:
      use_running_average: True normalizes with ``batch_stats``; False with the batch's
        statistics (and updates ``batch_stats``). May be given here or at call time.
      axis: feature axis or tuple of axes; every other axis is reduced.
      momentum: decay of the old running value.
      epsilon: added to the variance.
      dtype: output dtype; None gives the promotion of the input and parameter dtypes.
      param_dtype: dtype of ``scale`` and ``bias``.
      use_bias, use_scale: learn ``bias`` / ``scale``.
      bias_init, scale_init: initializers ``(key, shape, dtype)``.
      axis_name: named axis over which batch statistics combine (ignored while
        initializing, as in Flax).
      axis_index_groups: groups of ``axis_name`` indices.
      use_fast_variance, force_float32_reductions: accepted; see above.
      averaging, running_var, skip_nonfinite, checks, renorm, virtual_batch_size,
        statistics: bnjax's options (keyword-only); see :class:`bnjax.BatchNorm`.

    Example:
      >>> import jax, jax.numpy as jnp, bnjax.linen
      >>> bn = bnjax.linen.BatchNorm(use_running_average=False)
      >>> x = jnp.arange(12.0).reshape(4, 3)
      >>> variables = bn.init(jax.random.key(0), x)
      >>> y, updates = bn.apply(variables, x, mutable=["batch_stats"])
      >>> sorted(updates["batch_stats"])
      ['mean', 'var']
    """

    use_running_average: bool | None = None
    axis: int | tuple[int, ...] = -1
    momentum: float = 0.99
    epsilon: float = 1e-5
    dtype: Any = None
    param_dtype: Any = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Any = initializers.zeros
    scale_init: Any = initializers.ones
    axis_name: Any = None
    axis_index_groups: Any = None
    use_fast_variance: bool = True
    force_float32_reductions: bool = True

    def __post_init__(self):
        common.core_config(self, self.dtype, self.axis_name)  # validates every setting
        super().__post_init__()

    @nn.compact
    def __call__(self, x, use_running_average=None, *, mask=None, update_stats=None):
        """Normalizes ``x``; in training, updates ``batch_stats`` (which must be mutable).

        Args:
          x: array of any shape with the feature axes of ``axis``; integer and bool
            inputs are normalized in float32, as in Flax.
          use_running_average: as the attribute; exactly one of the two must be set.
          mask: optional array (nonzero counts) read as in the core: Flax's numpy
            broadcasting, plus one flag per example (``(N,)`` for any rank of ``x``); a
            lower-rank mask that fits two ways (``(4,)`` against ``(4, 4)``) is refused.
            False (zero) entries are left out of the statistics.
          update_stats: bnjax's option: average this batch into ``batch_stats``; defaults to
            ``not use_running_average``. ``use_running_average=False, update_stats=False``
            normalizes with the batch's statistics and needs no mutable collection.

        Returns:
          The normalized ``x``, same shape, dtype ``dtype`` or the promotion of the input
          and parameter dtypes.

        Raises:
          TypeError: ``x`` is complex or not an array, or a mode argument is not a bool.
          ValueError: ``mask`` does not broadcast to ``x``, or the axes or variables do
            not fit ``x``.
        """
        use_running_average = nn.merge_param(
            "use_running_average", self.use_running_average, use_running_average
        )
        training, update = common.modes(use_running_average, update_stats)
        initializing = self.is_initializing()
        core = common.core_config(self, None, None if initializing else self.axis_name)
        feat = core.feature_shape(jnp.shape(x))
        mean, var, count = _stat_variables(self, feat, common.needs_count(core))
        pd = self.param_dtype
        scale = self.param("scale", self.scale_init, feat, pd) if self.use_scale else None
        bias = self.param("bias", self.bias_init, feat, pd) if self.use_bias else None
        x = jnp.asarray(x)
        with jax.numpy_dtype_promotion("standard"):  # Flax's output dtype, also in strict mode
            out_dtype = dtypes.canonicalize_dtype(x, scale, bias, dtype=self.dtype)
        if jnp.issubdtype(x.dtype, jnp.integer) or x.dtype == jnp.bool_:
            x = x.astype(jnp.float32)  # as in Flax, integer inputs are normalized in float32
        v.check_input(x)  # complex inputs are refused
        core = dataclasses.replace(core, dtype=out_dtype)
        stats = BatchNormState(mean.value, var.value, None if count is None else count.value)
        update = update and not initializing
        # The module path names this call in bnjax.testing.audit's findings.
        with marks.label("/".join(self.scope.path) or type(self).__name__):
            y, new = common.run(
                core, scale, bias, stats, x, training=training, update_stats=update, mask=mask
            )
        if update:
            mean.value, var.value = new.mean, new.var
            if count is not None:
                count.value = new.count
        return y


def _stat_variables(module, feat, with_count):
    """``batch_stats/{mean,var}`` in Flax's dtypes, and ``count`` when it is needed.

    A count absent from immutable variables (Flax's own) is left absent: None. A plain
    function, not a method: linen wraps every method and records it as a call, which
    ``nn.tabulate`` then shows as a layer of its own (and its FLOP count re-runs outside
    ``setup``/``compact``).
    """
    stat_dtype = jnp.float32 if module.force_float32_reductions else module.param_dtype
    mean = module.variable("batch_stats", "mean", lambda s: jnp.zeros(s, stat_dtype), feat)
    var = module.variable("batch_stats", "var", lambda s: jnp.ones(s, stat_dtype), feat)
    count = None
    if with_count and (
        module.has_variable("batch_stats", "count") or module.is_mutable_collection("batch_stats")
    ):
        count = module.variable("batch_stats", "count", jnp.zeros, (), jnp.int32)
    return mean, var, count
