"""``bnjax.BatchNorm``: a frozen configuration with pure ``init`` and ``apply``."""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from collections.abc import Callable, Hashable
from typing import Any

import jax
import jax.numpy as jnp

from bnjax._src import checks as runtime_checks
from bnjax._src import ghost, marks
from bnjax._src import validation as v
from bnjax._src.moments import STATISTICS, accumulation_dtype, batch_moments, path
from bnjax._src.normalize import Spec, affine_pass, multiplier, train_normalize
from bnjax._src.reduction import Reduction, expand_mask
from bnjax._src.renorm import Renorm
from bnjax._src.sharding import vary_like
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
      epsilon: added to the variance before the square root. 0 is allowed, but a feature
        whose variance is 0 (a constant feature, or one element per feature) then divides
        0 by 0: its output is NaN.
      center: learn a bias (beta).
      scale: learn a scale (gamma).
      averaging: ``"ema"``, ``"debiased"`` (zero-debiased EMA), ``"cumulative"`` or
        ``"ema_from_first"`` (an EMA that takes the first batch whole), as
        ``bnjax/_src/averaging.py`` says.
      running_var: ``"biased"``, or ``"unbiased"`` to store ``n/(n-1)`` times the batch
        variance in the running average (PyTorch).
      axis_name: named axis (pmap, shard_map, vmap) over which batch statistics combine.
      axis_index_groups: groups of ``axis_name`` indices, as for ``jax.lax.psum``.
      skip_nonfinite: a batch with non-finite statistics leaves the state unchanged.
      dtype: output dtype; None keeps the input's.
      param_dtype: dtype of ``scale`` and ``bias``.
      scale_init, bias_init: optional initializers ``(key, shape, dtype) -> array``.
      checks: add runtime checks to ``apply`` (statistics never updated, non-finite
        inputs, bad running mean or variance, batch statistics beyond the state's dtype).
        A failed check issues a ``bnjax.CheckWarning`` from a host callback
        (``jax.debug.callback``), eagerly and under ``jit``, ``vmap``, ``scan``, ``grad``
        or ``shard_map``; ``warnings.simplefilter("error", bnjax.CheckWarning)`` makes it
        an error. Under ``checkify.checkify`` the failures also come back in ``err``.
        A program with host callbacks cannot be serialized by ``jax.export``, so export
        with ``checks=False``. See ``bnjax/_src/checks.py``. False traces no check.
      renorm: None, or a :class:`bnjax.Renorm` for batch renormalization
        (``bnjax/_src/renorm.py``): in training, correct the batch-normalized output by
        ``r = clip(sigma_B / sigma, 1/rmax, rmax)`` and ``d = clip((mu_B - mu) / sigma,
        -dmax, dmax)`` towards the running statistics, the limits ramping up as it says.
      virtual_batch_size: ghost batch norm (``bnjax/_src/ghost.py``): in training, split
        axis 0 into chunks of this many rows, each normalized with its own statistics and
        averaged into the running state in order. None uses the whole batch.
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
    renorm: Renorm | None = None
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
        if self.renorm is not None and not isinstance(self.renorm, Renorm):
            raise TypeError(
                f"renorm must be None or a bnjax.Renorm; got {self.renorm!r}. For batch "
                "renormalization pass renorm=bnjax.Renorm() (or Renorm(rmax=..., dmax=...))"
            )
        v.check_int("virtual_batch_size", self.virtual_batch_size, low=1, allow_none=True)
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
        feat = self.feature_shape(v.shape_of(x_or_shape))
        if key is None and (self.scale_init is not None or self.bias_init is not None):
            raise TypeError("key is None, but scale_init or bias_init needs a PRNG key")
        keys = jax.random.split(key) if key is not None else (None, None)
        params = BatchNormParams(
            scale=self._param("scale_init", self.scale, jnp.ones, keys[0], feat),
            bias=self._param("bias_init", self.center, jnp.zeros, keys[1], feat),
        )
        sd = accumulation_dtype(self.param_dtype, *_example_dtype(x_or_shape))
        state = BatchNormState(
            mean=jnp.zeros(feat, sd), var=jnp.ones(feat, sd), count=jnp.zeros((), jnp.int32)
        )
        return params, state

    def _param(self, init_name, enabled, fill, key, shape):
        """One parameter in ``param_dtype``: None where disabled, else ``fill`` or, if set,
        the initializer named ``init_name``, checked to return ``shape``."""
        init = getattr(self, init_name)
        if not enabled or init is None:
            return fill(shape, self.param_dtype) if enabled else None
        value = jnp.asarray(init(key, shape, self.param_dtype))
        if value.shape != shape:
            raise ValueError(f"{init_name} returned shape {value.shape}; expected {shape}")
        return value.astype(self.param_dtype)

    # -- apply ----------------------------------------------------------------------

    def apply(
        self, params, state, x, *, training, update_stats=None, mask=None
    ) -> tuple[jax.Array, BatchNormState]:
        """Normalizes ``x`` and returns the new running state.

        One call is one computation, ``(y, moments)``, then one update of ``state`` by the
        batch's moments (``state.fold``).

        Args:
          params: ``BatchNormParams`` from :meth:`init`.
          state: ``BatchNormState`` from :meth:`init` or a previous call (or the
            accumulator :func:`bnjax.recalibrate` passes in its place).
          x: float array of any shape with the feature axes of :attr:`axis`.
          training: required. True normalizes with the statistics of this batch; False
            with the running statistics in ``state``.
          update_stats: average this batch into the running statistics; defaults to
            ``training``. When False, the returned state is ``state`` itself.
          mask: optional bool array; False entries are left out of the statistics. Of
            ``x``'s rank it broadcasts with numpy's rules; of lower rank it is one flag per
            example (``x``'s leading axes: ``(N,)``, ``(N, L)``), ``x`` without its feature
            axes (``(N, H, W)`` for NCHW), or numpy's trailing axes, whichever fits; one
            that fits two ways is refused (``reduction.expand_mask``). A mask of ``x``'s
            rank (``mask[:, None, None, None]``) never depends on the batch size.

        Returns:
          ``(y, new_state)``: ``y`` has the shape of ``x`` and dtype ``self.dtype`` (or
          ``x.dtype``).

        Raises:
          TypeError: ``training``/``update_stats`` not a Python bool, ``x`` not floating,
            ``mask`` not bool.
          ValueError: axes out of range for ``x``, or params/state/mask shapes that do not
            match ``x``.
        """
        update_stats = training if update_stats is None else update_stats
        x, mask, axes = self._validated(params, state, x, mask, training, update_stats)
        update_stats = update_stats and x.size > 0  # an empty batch teaches nothing
        chunked = training and self.virtual_batch_size is not None
        if training and x.size:
            normalize, args = self._training_pass(params, state.running, x, mask, axes)
            y, moments = normalize(*args)
        else:
            y = self._inference(params, state.running, x, axes)
            red = Reduction(axes, mask, self.axis_name, self.axis_index_groups)
            statistics = path(self.statistics, named_axis=self.axis_name is not None)
            x_stats = jax.lax.stop_gradient(x)  # statistics for the state: no tangent over x
            moments = batch_moments(x_stats, red, statistics=statistics) if update_stats else None
        call_id = marks.new_call_id()
        steps = 0 if not x.size else x.shape[0] // self.virtual_batch_size if chunked else 1
        flags = {"training": training, "update_stats": update_stats, "steps": steps}
        y = marks.mark_call(y, state, call_id=call_id, **flags)
        if not update_stats:
            return y, state
        moments = jax.lax.stop_gradient(moments)
        if self.checks:
            runtime_checks.check_update(state.running, moments)
        new = ghost.in_order(state, moments, self) if chunked else state.fold(moments, self)
        return y, marks.mark_update(new, call_id=call_id)

    def _validated(self, params, state, x, mask, training, update_stats):
        """Checks one call's arguments against each other; ``(x, mask, reduced axes)``
        with ``x`` an array and ``mask`` expanded to ``x``'s rank. Warns and adds the
        runtime checks (``checks=True``) that the call's settings ask for."""
        v.check_static_bool("training", training)
        v.check_static_bool("update_stats", update_stats)
        v.check_input(x)
        x = jnp.asarray(x)
        feat_axes = v.feature_axes(self.axis, x.ndim, x.shape)
        axes = tuple(i for i in range(x.ndim) if i not in feat_axes)
        feat = tuple(x.shape[a] for a in feat_axes)
        running = v.check_trees(params, state, feat, self.scale, self.center)
        mask = expand_mask(mask, x.shape, feat_axes)
        if training and self.virtual_batch_size is not None:
            ghost.check_batch(self.virtual_batch_size, x.shape, axes)
        if self.checks:
            runtime_checks.check_apply(
                running, x, mask, training=training, update_stats=update_stats
            )
        if training:
            self._warn_if_one_element(x.shape, axes)
        return x, mask, axes

    def _training_pass(self, params, running, x, mask, axes):
        """The training pass (in virtual batches where configured) and its operands."""
        spec = Spec(
            reduce_axes=axes,
            epsilon=float(self.epsilon),
            axis_name=self.axis_name,
            axis_index_groups=self.axis_index_groups,
            out_dtype=self.dtype or x.dtype,
            renorm=self.renorm,
        )
        params = BatchNormParams(
            scale=vary_like(params.scale if self.scale else None, x),
            bias=vary_like(params.bias if self.center else None, x),
        )
        keep = _keep_dims(x.shape, axes)
        seen = BatchNormState(
            mean=self._as_seen(jnp.reshape(running.mean, keep), x),
            var=self._as_seen(jnp.reshape(running.var, keep), x),
            count=running.count if self.renorm is not None else None,
        )
        chunked = self.virtual_batch_size is not None
        statistics = path(self.statistics, named_axis=self.axis_name is not None, vmapped=chunked)
        args = (x, params, mask, seen, statistics)
        if chunked:
            k = self.virtual_batch_size
            return functools.partial(ghost.ghost_normalize, spec, virtual_batch_size=k), args
        return functools.partial(train_normalize, spec), args

    def _warn_if_one_element(self, x_shape, reduce_axes):
        """Warns when every (virtual) batch holds one element per feature: y equals bias."""
        per_feature = math.prod(x_shape[a] for a in reduce_axes)
        if self.virtual_batch_size is not None:  # checked: axis 0 splits into chunks
            per_feature //= max(x_shape[0] // self.virtual_batch_size, 1)
        if per_feature == 1 and self.axis_name is None:
            batch = "virtual batch" if self.virtual_batch_size is not None else "batch"
            warnings.warn(
                f"training=True with one element per feature in each {batch} (x shape "
                f"{tuple(x_shape)}, axis={self.axis}, virtual_batch_size="
                f"{self.virtual_batch_size}): each is its own batch mean, so the output "
                "equals bias",
                OneElementWarning,
                stacklevel=4,
            )

    def _as_seen(self, stat, x):
        """A running statistic as the training pass sees it, without gradient.

        With ``axis_name`` it stays replicated, so the combined statistics, and hence the
        new state, are provably replicated under ``shard_map`` (``out_specs=P()`` works).
        Without it every device has its own statistics, so it is made per-device too.
        """
        stat = jax.lax.stop_gradient(stat)
        return stat if self.axis_name is not None else vary_like(stat, x)

    def _inference(self, params, state, x, reduce_axes):
        """``x`` normalized with the running statistics of ``state``."""
        keep = _keep_dims(x.shape, reduce_axes)
        mean = jax.lax.stop_gradient(jnp.reshape(state.mean, keep))
        var = jax.lax.stop_gradient(jnp.reshape(state.var, keep))
        acc = accumulation_dtype(x.dtype, var.dtype)
        inv = jax.lax.rsqrt(var.astype(acc) + jnp.asarray(self.epsilon, acc))
        scale = jnp.reshape(params.scale, keep) if self.scale else None
        bias = jnp.reshape(params.bias, keep).astype(acc) if self.center else None
        out_dtype = self.dtype or x.dtype
        return affine_pass(x, mean.astype(acc), None, multiplier(scale, inv, acc), bias, out_dtype)


def _keep_dims(x_shape, reduce_axes) -> tuple[int, ...]:
    """``x_shape`` with the reduced axes of size 1: the shape of per-feature values."""
    return tuple(1 if i in reduce_axes else d for i, d in enumerate(x_shape))


def _example_dtype(x_or_shape) -> tuple:
    """The example batch's float dtype as JAX would hold it (float64 only with x64), or ()."""
    dtype = getattr(x_or_shape, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        return ()
    return (jax.dtypes.canonicalize_dtype(dtype),)
