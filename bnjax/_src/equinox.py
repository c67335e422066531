"""The implementation of :mod:`bnjax.equinox` (the module docstring there says what it is).

One example ``(C, *spatial)`` per call, the batch a named ``vmap`` axis: the core with
``axis=0`` and that ``axis_name`` reduces the spatial axes and combines counts, sums and
second moments across the named axis, giving the statistics of the whole batch.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Hashable
from typing import Any

import jax
import jax.numpy as jnp

from bnjax._src import extras, marks
from bnjax._src import validation as v
from bnjax._src.batchnorm import BatchNorm as Core
from bnjax._src.types import BatchNormParams, BatchNormState

try:
    import equinox as eqx
except ImportError as e:
    raise extras.missing("bnjax.equinox", "equinox", e) from e

MODES = ("ema", "batch", "legacy")
_CORE = {f.name: f.default for f in dataclasses.fields(Core)}
_LEGACY = (
    "bnjax.equinox.BatchNorm(mode='legacy'), the default as in Equinox, means mode='ema': in "
    "training it normalizes with the running statistics after this batch. Pass mode='batch' "
    "for batch statistics in training (what Flax, PyTorch and Haiku do), or mode='ema' to "
    "keep this behaviour without the warning."
)


class BatchNorm(eqx.nn.StatefulLayer):
    """Batch normalization with Equinox's interface and state, and bnjax's numerics.

    Takes the constructor and call arguments of ``eqx.nn.BatchNorm`` with the same
    meanings and defaults (``dtype`` and ``mode`` keyword-only: bnjax's functions take at
    most six positional parameters), plus bnjax's options. Like Equinox's, it normalizes
    one example of shape ``(input_size, *spatial)`` and must run inside ``vmap`` (or
    ``pmap``) over the batch with a matching ``axis_name``; its running statistics live in
    an ``eqx.nn.State`` as one :class:`bnjax.BatchNormState`. Every call is
    :meth:`bnjax.BatchNorm.apply` with ``axis=0`` and that ``axis_name``, so the statistics
    are exact and :func:`bnjax.testing.audit` finds every call.

    Modes, as in Equinox:

    * ``"batch"``: training normalizes with the batch's statistics; inference with
      zero-debiased running averages (``averaging="debiased"``). Equal to Equinox in
      training (outputs, gradients) and in the running mean. Equinox's running variance
      starts at 1 but is debiased as if it started at 0, so after ``n`` batches its
      inference variance exceeds the debiased average by ``momentum**n / (1 -
      momentum**n)``: 99 after one batch at ``momentum=0.99``, 0.58 after 100, 4e-5
      after 1000 (measured to float32 rounding). bnjax's is the average of the batches.
      A state converted from Equinox (``bnjax.interop.from_equinox``) keeps Equinox's
      excess, and the debiased average carries it on exactly as Equinox would.
    * ``"ema"`` (and ``"legacy"``, which warns and means ``"ema"``): training averages the
      batch into the running statistics (``averaging="ema_from_first"``: the first batch
      is taken whole) and normalizes with the result; inference with the running
      statistics. One training pass computes the batch's statistics once (the first
      batch's output and the new state), then the output is the new statistics' affine
      map, as in inference. Equal to Equinox in the outputs and the statistics, and in
      the gradients of the first batch. After it, bnjax's gradients treat the running
      statistics as constants, as in every bnjax inference pass; Equinox's also flow
      through this batch's ``1 - momentum`` share of them (measured: the input gradient
      differs by 1e-3 to 4e-3 relative at ``momentum=0.99``, 2e-2 at 0.9). Before the
      first training batch bnjax's statistics are mean 0 and variance 1; Equinox's are
      uninitialized buffers (zeros on XLA: inference then returns ``x / sqrt(eps)``).

    Equinox's variance, ``mean((x - mean)**2)``, is accurate on offset data too (float32,
    mean 1e3, std 0.1: within 2e-6 relative of float64; bnjax's 3e-7). The output dtype is
    the promotion of the input's and ``dtype``, as in Equinox.

    Args:
      input_size: the number of channels (axis 0 of each example).
      axis_name: the name of the batch axis of the enclosing ``vmap``/``pmap``, or a
        tuple (or list) of names to combine statistics over several axes.
      eps: added to the variance.
      channelwise_affine: learn a per-channel ``weight`` and ``bias``.
      momentum: decay of the old running value.
      inference: normalize with the running statistics and leave them unchanged; set by
        ``eqx.nn.inference_mode`` and overridden by the call's ``inference``.
      dtype: dtype of ``weight``, ``bias`` and the running statistics; None gives
        float32 (float64 when ``jax_enable_x64`` is on).
      mode: ``"batch"``, ``"ema"`` or ``"legacy"`` (see above).
      averaging: bnjax's running average; None gives the mode's: ``"debiased"`` for
        ``"batch"``, ``"ema_from_first"`` for ``"ema"`` (which takes the first batch
        whole, so not ``"ema"``).
      running_var: bnjax's option; see :class:`bnjax.BatchNorm` (also the next ones).
      skip_nonfinite: a batch with non-finite statistics leaves the state unchanged.
      checks: runtime checks of the inputs and statistics.
      statistics: how batch statistics are computed (every choice is exact).
      renorm: batch renormalization (a :class:`bnjax.Renorm`); needs ``mode="batch"``.
      virtual_batch_size: must be None: the layer sees one example per call, never the
        batch to split into virtual batches.

    Raises:
      TypeError, ValueError: an argument is invalid; the message names it, its value and
        what was expected.

    Example:
      >>> import equinox as eqx, jax.numpy as jnp, bnjax.equinox
      >>> bn, state = eqx.nn.make_with_state(bnjax.equinox.BatchNorm)(2, "batch", mode="batch")
      >>> x = jnp.array([[0.0, 1.0], [2.0, 5.0]])  # 2 examples of 2 channels
      >>> train = eqx.filter_vmap(bn, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
      >>> y, state = train(x, state)
      >>> tuple(round(float(a), 3) for a in y[:, 1])  # normalized over the batch
      (-1.0, 1.0)
      >>> int(state.get(bn.state_index).count)
      1
    """

    weight: jax.Array | None
    bias: jax.Array | None
    state_index: eqx.nn.StateIndex
    axis_name: Any
    inference: bool
    input_size: int = eqx.field(static=True)
    eps: float = eqx.field(static=True)
    channelwise_affine: bool = eqx.field(static=True)
    momentum: float = eqx.field(static=True)
    mode: str = eqx.field(static=True)
    dtype: Any = eqx.field(static=True)
    averaging: str = eqx.field(static=True)
    running_var: str = eqx.field(static=True)
    skip_nonfinite: bool = eqx.field(static=True)
    checks: bool = eqx.field(static=True)
    statistics: str = eqx.field(static=True)
    renorm: Any = eqx.field(static=True)

    def __init__(
        self,
        input_size: int,
        axis_name: Hashable | tuple[Hashable, ...],
        eps: float = 1e-5,
        channelwise_affine: bool = True,
        momentum: float = 0.99,
        inference: bool = False,
        *,
        dtype: Any = None,
        mode: str = "legacy",
        averaging: str | None = None,
        running_var: str = _CORE["running_var"],
        skip_nonfinite: bool = _CORE["skip_nonfinite"],
        checks: bool = _CORE["checks"],
        statistics: str = _CORE["statistics"],
        renorm: Any = _CORE["renorm"],
        virtual_batch_size: int | None = _CORE["virtual_batch_size"],
    ):
        v.check_int("input_size", input_size, low=1, what="the number of channels")
        v.check_number("eps", eps, low=0.0)
        v.check_bool("channelwise_affine", channelwise_affine)
        v.check_number("momentum", momentum, low=0.0, high=1.0)
        v.check_bool("inference", inference)
        v.check_choice("mode", mode, MODES)
        if mode == "legacy":
            warnings.warn(_LEGACY, UserWarning, stacklevel=2)
            mode = "ema"
        _check_options(mode, renorm=renorm, virtual_batch_size=virtual_batch_size)
        dtype = jax.dtypes.canonicalize_dtype(jnp.float64) if dtype is None else dtype
        self.input_size = input_size
        self.axis_name = _axis_name(axis_name)
        self.eps = eps
        self.channelwise_affine = channelwise_affine
        self.momentum = momentum
        self.inference = inference
        self.mode = mode
        self.dtype = v.float_dtype("dtype", dtype)
        if averaging is None:  # the running average of Equinox's mode
            averaging = "debiased" if mode == "batch" else "ema_from_first"
        elif mode == "ema" and averaging == "ema":
            raise ValueError(
                "averaging='ema' with mode='ema' is not supported: this mode takes the first "
                "batch whole, and 'ema' would blend it with the initial mean 0 and variance 1. "
                "Use averaging=None (Equinox's: 'ema_from_first'), 'debiased' or 'cumulative'"
            )
        self.averaging = averaging
        self.running_var = running_var
        self.skip_nonfinite = skip_nonfinite
        self.checks = checks
        self.statistics = statistics
        self.renorm = renorm
        self._core(self.dtype)  # validates bnjax's options now, not at the first call
        shape = (input_size,)
        self.weight = jnp.ones(shape, self.dtype) if channelwise_affine else None
        self.bias = jnp.zeros(shape, self.dtype) if channelwise_affine else None
        self.state_index = eqx.nn.StateIndex(
            BatchNormState(
                mean=jnp.zeros(shape, self.dtype),
                var=jnp.ones(shape, self.dtype),
                count=jnp.zeros((), jnp.int32),
            )
        )

    def __call__(self, x, state, *, key=None, inference=None):
        """Normalizes one example; in training, updates the running statistics in ``state``.

        Args:
          x: one example of shape ``(input_size, *spatial)``, floating.
          state: the ``eqx.nn.State`` holding this layer's statistics.
          key: ignored (Equinox's layer interface).
          inference: overrides the attribute when not None.

        Returns:
          ``(y, state)``: ``y`` of the shape of ``x``; ``state`` with the new statistics
          (the given one in inference).

        Raises:
          TypeError: ``inference`` is not a Python bool, or ``x`` is not floating.
          ValueError: ``x`` does not have ``input_size`` channels on axis 0.
          NameError: no enclosing ``vmap``/``pmap`` has the axis ``axis_name``.
        """
        del key
        inference = self.inference if inference is None else inference
        v.check_static_bool("inference", inference)
        x = jnp.asarray(x)
        v.check_input(x)
        if x.ndim == 0 or x.shape[0] != self.input_size:
            raise ValueError(
                f"x has shape {x.shape}; expected ({self.input_size}, ...): one example with "
                f"its input_size={self.input_size} channels first. This layer sees one "
                f"example per call: vmap over the batch with axis_name={self.axis_name!r}"
            )
        with jax.numpy_dtype_promotion("standard"):  # the same whether or not strict is on
            out_dtype = jnp.promote_types(x.dtype, self.dtype)
        core = self._core(out_dtype)
        params = BatchNormParams(scale=self.weight, bias=self.bias)
        stats = state.get(self.state_index)
        with marks.label(_label(self.state_index)):
            if inference:
                y, _ = core.apply(params, stats, x, training=False)
                return y, state
            y, new = core.apply(params, stats, x, training=True)
            if self.mode == "ema":
                y = _ema_output(core, params, stats, new, x, y)
        return y, state.set(self.state_index, new)

    def _core(self, dtype) -> Core:
        """The :class:`bnjax.BatchNorm` of a call whose output has ``dtype``."""
        return Core(
            axis=0,
            momentum=self.momentum,
            epsilon=self.eps,
            center=self.channelwise_affine,
            scale=self.channelwise_affine,
            averaging=self.averaging,
            running_var=self.running_var,
            axis_name=self.axis_name,
            skip_nonfinite=self.skip_nonfinite,
            dtype=dtype,
            param_dtype=self.dtype,
            checks=self.checks,
            renorm=self.renorm,
            statistics=self.statistics,
        )


def _ema_output(core: Core, params, old: BatchNormState, new: BatchNormState, x, y_batch):
    """Equinox's ``"ema"`` training output, given the training pass's ``(y_batch, new)``.

    The training pass computed the batch's statistics once: ``y_batch`` normalizes with
    them, and ``new`` has them averaged in (``averaging="ema_from_first"``: at count 0 the
    batch is taken whole, so ``new`` *is* the batch's statistics and ``y_batch``, with its
    gradient through them, is Equinox's first output). From the second batch on the output
    normalizes with ``new``: an inference pass, the affine map alone, no statistics.
    """
    y_running, _ = core.apply(params, new, x, training=False)
    return jnp.where(old.count == 0, y_batch, y_running)


def _axis_name(axis_name):
    """Equinox's ``axis_name``: a name, or a sequence of names (kept as a tuple)."""
    if isinstance(axis_name, list):
        axis_name = tuple(axis_name)
    if axis_name is None or not isinstance(axis_name, Hashable):
        raise TypeError(
            f"axis_name must name the batch axis of the enclosing vmap or pmap (a hashable "
            f"such as 'batch', or a tuple of names); got {axis_name!r}"
        )
    return axis_name


def _check_options(mode: str, *, renorm, virtual_batch_size) -> None:
    """The bnjax options that have no meaning for an Equinox layer or mode."""
    if virtual_batch_size is not None:
        raise ValueError(
            f"virtual_batch_size={virtual_batch_size!r} is not supported; expected None. "
            "This layer sees one example per call (the batch is a vmapped axis), never the "
            "batch to split: vmap over each virtual batch with an axis_name of its own"
        )
    if renorm is not None and mode != "batch":
        raise ValueError(
            f"renorm={renorm!r} needs mode='batch'; got mode={mode!r}, which normalizes with the "
            "running statistics in training already"
        )


def _label(index) -> str | None:
    """The layer's path for audit findings: ``make_with_state`` names each index by it."""
    marker = index.marker
    return marker.removesuffix(".state_index") if isinstance(marker, str) else None
