"""``bnjax.BatchNorm``: a frozen configuration with pure ``init`` and ``apply``."""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Hashable
from typing import Any

import jax
import jax.numpy as jnp

from bnjax._src import checks as runtime_checks
from bnjax._src import ghost, renorm
from bnjax._src import validation as v
from bnjax._src.averaging import fold
from bnjax._src.moments import STATISTICS, accumulation_dtype, batch_moments
from bnjax._src.normalize import Spec, affine, multiplier, train_normalize, vary_like
from bnjax._src.recalibrate import PopulationAccumulator, accumulate
from bnjax._src.reduction import Reduction, expand_mask
from bnjax._src.types import BatchNormParams, BatchNormState


class OneElementWarning(UserWarning):
    """``training=True`` with one element per feature: the output equals ``bias``."""


@dataclasses.dataclass(frozen=True)
class BatchNorm:
    """Batch normalization with explicit state.

    The configuration is frozen and hashable (usable as a static ``jax.jit`` argument).
    ``init`` creates the parameters and the running state; ``apply`` is a pure function
    that returns the output and the new state, so an update can never be forgotten.

    Attributes:
      axis: feature axis, or tuple of axes; every other axis is reduced.
      momentum: decay of the old running value, ``r <- momentum*r + (1-momentum)*batch``.
      epsilon: added to the variance before the square root.
      center: learn a bias (beta).
      scale: learn a scale (gamma).
      averaging: ``"ema"``, ``"debiased"`` (zero-debiased EMA) or ``"cumulative"``.
      running_var: ``"biased"``, or ``"unbiased"`` to store ``n/(n-1)`` times the batch
        variance in the running average (PyTorch).
      axis_name: named axis (pmap, shard_map, vmap) over which batch statistics combine.
      axis_index_groups: groups of ``axis_name`` indices, as for ``jax.lax.psum``.
      skip_nonfinite: a batch with non-finite statistics leaves the state unchanged.
      dtype: output dtype; None keeps the input's.
      param_dtype: dtype of ``scale`` and ``bias``.
      scale_init, bias_init: optional initializers ``(key, shape, dtype) -> array``.
      checks: add ``jax.experimental.checkify`` checks to ``apply`` (never-updated
        statistics in inference, non-finite inputs, bad running variance); see
        ``bnjax/_src/checks.py``. False traces no check.
      renorm: batch renormalization (``bnjax/_src/renorm.py``): in training, correct the
        batch-normalized output by ``r = clip(sigma_B / sigma, 1/rmax, rmax)`` and
        ``d = clip((mu_B - mu) / sigma, -dmax, dmax)`` towards the running statistics.
      renorm_rmax, renorm_dmax: the limits of ``r`` (at least 1) and ``|d|``.
      renorm_ramp_start, renorm_ramp_steps: the limits stay at 1 and 0 for the first
        ``renorm_ramp_start`` batches (``state.count``), then grow linearly to
        ``renorm_rmax`` and ``renorm_dmax`` over ``renorm_ramp_steps`` batches.
      virtual_batch_size: ghost batch norm (``bnjax/_src/ghost.py``): in training, split
        axis 0 into chunks of this many rows, each normalized with its own statistics and
        folded into the running state in order. None uses the whole batch.
      statistics: how batch statistics are computed (``bnjax/_src/moments.py``); every
        choice is exact. ``"checked"``: plain sums checked by a conditional, exact passes
        otherwise (fastest on XLA:CPU). ``"branchless"``: no data-dependent control flow
        (for GPU and TPU, where a conditional waits on the host). ``"auto"``: branchless
        everywhere but CPU, chosen when the program is lowered for its platform.

    Example:
      >>> import jax.numpy as jnp, bnjax
      >>> bn = bnjax.BatchNorm(momentum=0.99, epsilon=1e-3)
      >>> x = jnp.array([[-10.0], [0.0], [10.0]])
      >>> params, state = bn.init(x)
      >>> y, state = bn.apply(params, state, x, training=True)
      >>> [round(float(v), 4) for v in y[:, 0]]
      [-1.2247, 0.0, 1.2247]
      >>> int(state.count)
      1
    """

    axis: int | tuple[int, ...] = -1
    momentum: float = 0.99
    epsilon: float = 1e-5
    center: bool = True
    scale: bool = True
    averaging: str = "ema"
    running_var: str = "biased"
    axis_name: Hashable | None = None
    axis_index_groups: Any = None
    skip_nonfinite: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    scale_init: Callable | None = None
    bias_init: Callable | None = None
    checks: bool = False
    renorm: bool = False
    renorm_rmax: float = 3.0
    renorm_dmax: float = 5.0
    renorm_ramp_start: int = 0
    renorm_ramp_steps: int = 0
    virtual_batch_size: int | None = None
    statistics: str = "auto"

    def __post_init__(self):
        set_ = object.__setattr__
        set_(self, "axis", v.as_axes(self.axis))
        v.check_number("momentum", self.momentum, low=0.0, high=1.0)
        # Above float32's largest value epsilon is inf where statistics are float32.
        v.check_number("epsilon", self.epsilon, low=0.0, high=float(jnp.finfo(jnp.float32).max))
        for name in ("center", "scale", "skip_nonfinite", "checks"):
            v.check_bool(name, getattr(self, name))
        v.check_choice("averaging", self.averaging, v.AVERAGING)
        v.check_choice("running_var", self.running_var, v.RUNNING_VAR)
        v.check_choice("statistics", self.statistics, STATISTICS)
        v.check_bool("renorm", self.renorm)
        v.check_number("renorm_rmax", self.renorm_rmax, low=1.0)
        v.check_number("renorm_dmax", self.renorm_dmax, low=0.0)
        renorm.check_count("renorm_ramp_start", self.renorm_ramp_start)
        renorm.check_count("renorm_ramp_steps", self.renorm_ramp_steps)
        renorm.check_count("virtual_batch_size", self.virtual_batch_size, low=1, allow_none=True)
        if self.axis_name is not None and not isinstance(self.axis_name, Hashable):
            raise TypeError(f"axis_name must be hashable; got {self.axis_name!r}")
        set_(self, "axis_index_groups", v.as_groups(self.axis_index_groups))
        if self.axis_index_groups is not None and self.axis_name is None:
            raise ValueError("axis_index_groups is set but axis_name is None; set both or neither")
        set_(self, "dtype", v.float_dtype("dtype", self.dtype, allow_none=True))
        set_(self, "param_dtype", v.float_dtype("param_dtype", self.param_dtype))
        for name in ("scale_init", "bias_init"):
            if getattr(self, name) is not None and not callable(getattr(self, name)):
                raise TypeError(
                    f"{name} must be callable (key, shape, dtype); got {getattr(self, name)!r}"
                )

    # -- init -----------------------------------------------------------------------

    def feature_shape(self, x_shape) -> tuple[int, ...]:
        """The shape of ``params`` and ``state`` leaves for inputs of shape ``x_shape``."""
        x_shape = tuple(x_shape)
        return tuple(x_shape[a] for a in v.feature_axes(self.axis, len(x_shape), x_shape))

    def init(self, x_or_shape, *, key=None) -> tuple[BatchNormParams, BatchNormState]:
        """Creates parameters and a fresh running state.

        Args:
          x_or_shape: an example batch (anything with ``.shape``) or its shape.
          key: a PRNG key, needed only when ``scale_init`` or ``bias_init`` is set.

        Returns:
          ``(params, state)``: ``BatchNormParams(scale=ones, bias=zeros)`` in
          ``param_dtype`` (None where disabled), and ``BatchNormState(mean=zeros,
          var=ones, count=0)``. The statistics are kept in the widest of float32,
          ``param_dtype`` and the example batch's dtype: a float64 example (with
          ``jax_enable_x64``) gives float64 running statistics, as precise as training.

        Raises:
          TypeError: ``x_or_shape`` is neither an array nor a shape, or an initializer is
            set without ``key``.
          ValueError: ``axis`` is out of range for the shape.
        """
        shape = v.shape_of(x_or_shape)
        feat = self.feature_shape(shape)
        inits = (self.scale_init, self.bias_init)
        if key is None and any(f is not None for f in inits):
            raise TypeError("key is None, but scale_init or bias_init needs a PRNG key")
        k_scale, k_bias = jax.random.split(key) if key is not None else (None, None)
        pd = self.param_dtype
        scale = _make(self.scale, self.scale_init, k_scale, feat, pd, jnp.ones, "scale_init")
        bias = _make(self.center, self.bias_init, k_bias, feat, pd, jnp.zeros, "bias_init")
        sd = accumulation_dtype(pd, *_example_dtype(x_or_shape))
        state = BatchNormState(
            mean=jnp.zeros(feat, sd), var=jnp.ones(feat, sd), count=jnp.zeros((), jnp.int32)
        )
        return BatchNormParams(scale=scale, bias=bias), state

    # -- apply ----------------------------------------------------------------------

    def apply(
        self, params, state, x, *, training, update_stats=None, mask=None
    ) -> tuple[jax.Array, BatchNormState]:
        """Normalizes ``x`` and returns the new running state.

        Args:
          params: ``BatchNormParams`` from :meth:`init`.
          state: ``BatchNormState`` from :meth:`init` or a previous call; or a
            ``PopulationAccumulator`` (see :func:`bnjax.recalibrate`), which gets this
            batch's exact moments merged in instead of a running-average update.
          x: float array of any shape with the feature axes of :attr:`axis`.
          training: required. True normalizes with the statistics of this batch; False
            with the running statistics in ``state``.
          update_stats: fold this batch into the running statistics; defaults to
            ``training``. When False, the returned state is ``state`` itself.
          mask: optional bool array, the shape of ``x`` without its feature axes (or
            broadcastable to it, or to ``x``); False entries are left out of the statistics.

        Returns:
          ``(y, new_state)``: ``y`` has the shape of ``x`` and dtype ``self.dtype`` (or
          ``x.dtype``).

        Raises:
          TypeError: ``training``/``update_stats`` not a Python bool, ``x`` not floating,
            ``mask`` not bool.
          ValueError: axes out of range for ``x``, or params/state/mask shapes that do not
            match ``x``.
        """
        if isinstance(state, PopulationAccumulator):  # recalibration, see recalibrate.py
            return accumulate(self, params, state, x, training=training, mask=mask)
        v.check_training("training", training)
        update_stats = training if update_stats is None else update_stats
        v.check_training("update_stats", update_stats)
        v.check_input(x)
        x = jnp.asarray(x)
        feat_axes = v.feature_axes(self.axis, x.ndim, x.shape)
        red_axes = tuple(i for i in range(x.ndim) if i not in feat_axes)
        v.check_trees(params, state, tuple(x.shape[a] for a in feat_axes), self.scale, self.center)
        mask = expand_mask(mask, x.shape, feat_axes)
        if self.checks:
            runtime_checks.check_apply(state, x, mask, training=training, update_stats=update_stats)
        if training:
            self._warn_if_one_element(x.shape, red_axes)
        keep = tuple(1 if i in red_axes else d for i, d in enumerate(x.shape))
        out_dtype = self.dtype or x.dtype
        run_mean = jax.lax.stop_gradient(jnp.reshape(state.mean, keep))
        run_var = jax.lax.stop_gradient(jnp.reshape(state.var, keep))
        if x.size == 0:  # nothing to learn from: inference, state kept
            return self._inference(params, run_mean, run_var, x, keep, out_dtype), state
        if training:
            spec = Spec(
                red_axes,
                float(self.epsilon),
                self.axis_name,
                self.axis_index_groups,
                out_dtype,
                self.statistics,
            )
            y, moments = self._train(spec, params, state, x, mask, run_mean, run_var)
        else:
            y = self._inference(params, run_mean, run_var, x, keep, out_dtype)
            moments = None
            if update_stats:
                red = Reduction(red_axes, mask, self.axis_name, self.axis_index_groups)
                x_stats = jax.lax.stop_gradient(x)
                moments = batch_moments(x_stats, red, statistics=self.statistics)
        if not update_stats:
            return y, state
        if self.checks:
            runtime_checks.check_update(state, moments)
        chunked = training and self.virtual_batch_size is not None
        return y, (ghost.fold_chunks if chunked else fold)(
            state,
            moments,
            momentum=self.momentum,
            averaging=self.averaging,
            running_var=self.running_var,
            skip_nonfinite=self.skip_nonfinite,
        )

    def _warn_if_one_element(self, x_shape, red_axes):
        """Warns when every (virtual) batch holds one element per feature: y equals bias."""
        per_feature = math.prod(x_shape[a] for a in red_axes)
        if self.virtual_batch_size is not None:
            chunks = ghost.check_batch(self.virtual_batch_size, x_shape, red_axes)
            per_feature //= max(chunks, 1)
        if per_feature == 1 and self.axis_name is None:
            batch = "virtual batch" if self.virtual_batch_size is not None else "batch"
            warnings.warn(
                f"training=True with one element per feature in each {batch} (x shape "
                f"{tuple(x_shape)}, axis={self.axis}, virtual_batch_size="
                f"{self.virtual_batch_size}): each is its own batch mean, so the output "
                "equals bias",
                OneElementWarning,
                stacklevel=3,
            )

    def _train(self, spec, params, state, x, mask, run_mean, run_var):
        """The training pass: ``(y, moments)``, the moments without gradient."""
        scale = vary_like(params.scale if self.scale else None, x)
        bias = vary_like(params.bias if self.center else None, x)
        fallbacks = self._fallbacks(run_mean, run_var, x)
        if self.renorm or self.virtual_batch_size is not None:
            y, moments = self._toolkit_train(spec, x, scale, bias, mask, fallbacks, state)
        else:
            y, moments = train_normalize(spec, x, scale, bias, mask, *fallbacks)
        return y, jax.lax.stop_gradient(moments)

    def _toolkit_train(self, spec, x, scale, bias, mask, fallbacks, state):
        """The training pass with batch renormalization and/or virtual batches."""
        clip = None
        if self.renorm:
            clip = renorm.limits(
                self.renorm_rmax,
                self.renorm_dmax,
                self.renorm_ramp_start,
                self.renorm_ramp_steps,
                state.count,
                accumulation_dtype(x.dtype),
            )
        if self.virtual_batch_size is None:
            return train_normalize(spec, x, scale, bias, mask, *fallbacks, clip)
        k = self.virtual_batch_size
        return ghost.ghost_normalize(k, spec, x, scale, bias, mask, *fallbacks, clip)

    def _fallbacks(self, run_mean, run_var, x):
        """The running statistics as seen by the training pass.

        With ``axis_name`` they stay replicated, so the combined statistics, and hence the
        new state, are provably replicated under ``shard_map`` (``out_specs=P()`` works).
        Without it every device has its own statistics, so they are made per-device too.
        """
        if self.axis_name is not None:
            return run_mean, run_var
        return vary_like(run_mean, x), vary_like(run_var, x)

    def _inference(self, params, run_mean, run_var, x, keep, out_dtype):
        acc = accumulation_dtype(x.dtype, run_var.dtype)
        inv = jax.lax.rsqrt(run_var.astype(acc) + jnp.asarray(self.epsilon, acc))
        scale = jnp.reshape(params.scale, keep) if self.scale else None
        bias = jnp.reshape(params.bias, keep).astype(acc) if self.center else None
        return affine(x, run_mean.astype(acc), None, multiplier(scale, inv, acc), bias, out_dtype)


def _example_dtype(x_or_shape) -> tuple:
    """The example batch's float dtype as JAX would hold it (float64 only with x64), or ()."""
    dtype = getattr(x_or_shape, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        return ()
    return (jax.dtypes.canonicalize_dtype(dtype),)


def _make(enabled, init, key, shape, dtype, default, name):
    if not enabled:
        return None
    if init is None:
        return default(shape, dtype)
    value = jnp.asarray(init(key, shape, dtype))
    if value.shape != shape:
        raise ValueError(f"{name} returned shape {value.shape}; expected {shape}")
    return value.astype(dtype)
