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

# The core's fields that Equinox's own arguments set (``axis`` is 0: one example per call,
# channels first); every other field of bnjax.BatchNorm is one of bnjax's options, taken by
# keyword under the core's name and forwarded, so a new core option needs nothing here.
FROM_EQUINOX = ("axis", "momentum", "epsilon", "center", "scale", "axis_name", "dtype",
                "param_dtype")  # fmt: skip
OPTIONS = {f.name: f.default for f in dataclasses.fields(Core) if f.name not in FROM_EQUINOX}
# Each mode's running average when ``averaging`` is None: Equinox's own.
MODE_AVERAGING = {"batch": "debiased", "ema": "ema_from_first"}
# The core's options an Equinox layer cannot take, and why.
_UNSUPPORTED = {
    "virtual_batch_size": (
        "This layer sees one example per call (the batch is a vmapped axis), never the batch "
        "to split: vmap over each virtual batch with an axis_name of its own"
    ),
    **{
        f"{field}_init": f"This layer makes its {leaf} without a key, as Equinox's does: set "
        f"another with eqx.tree_at(lambda m: m.{leaf}, layer, new_{leaf})"
        for field, leaf in (("scale", "weight"), ("bias", "bias"))
    },
}
_LEGACY = (
    "bnjax.equinox.BatchNorm(mode='legacy'), the default as in Equinox, means mode='ema': in "
    "training it normalizes with the running statistics after this batch. Pass mode='batch' "
    "for batch statistics in training (what Flax, PyTorch and Haiku do), or mode='ema' to "
    "keep this behaviour without the warning."
)


class BatchNorm(eqx.nn.StatefulLayer):
    """Batch normalization with Equinox's interface and state, and bnjax's numerics.

    Takes the constructor and call arguments of ``eqx.nn.BatchNorm``, in its order, with
    the same meanings and defaults, plus bnjax's options by keyword. Like Equinox's, it
    normalizes one example of shape ``(input_size, *spatial)`` and must run inside
    ``vmap`` (or ``pmap``) over the batch with a matching ``axis_name``; its running
    statistics live in an ``eqx.nn.State`` as one :class:`bnjax.BatchNormState`. Every
    call is :meth:`bnjax.BatchNorm.apply` with ``axis=0`` and that ``axis_name``, so the
    statistics are exact and :func:`bnjax.testing.audit` finds every call.

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
      **options: bnjax's options, the fields of :class:`bnjax.BatchNorm` that Equinox's
        arguments do not set (:data:`OPTIONS`, with the core's meanings and defaults),
        except: ``averaging`` None (the default) gives the mode's (:data:`MODE_AVERAGING`),
        and in ``mode="ema"`` must take the first batch whole (not ``"ema"``);
        ``renorm`` needs ``mode="batch"`` (``"ema"`` normalizes with the running
        statistics in training already); ``virtual_batch_size``, ``scale_init`` and
        ``bias_init`` must be None (the layer sees one example per call, never the batch
        to split; it makes ``weight`` and ``bias`` without a key, as Equinox does);
        ``axis_index_groups`` works under ``pmap`` only (JAX's ``vmap`` refuses it).
        Each reads back as an attribute (``layer.averaging``); :attr:`options` holds
        those that differ from the core's defaults.

    Raises:
      TypeError, ValueError: an argument is invalid, or an option unknown; the message
        names it, its value and what was expected.

    Example:
      >>> import equinox as eqx, jax.numpy as jnp, bnjax.equinox
      >>> bn, state = eqx.nn.make_with_state(bnjax.equinox.BatchNorm)(2, "batch", mode="batch")
      >>> x = jnp.array([[0.0, 1.0], [2.0, 5.0]])  # 2 examples of 2 channels
      >>> train = eqx.filter_vmap(bn, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
      >>> y, state = train(x, state)
      >>> tuple(round(float(a), 3) for a in y[:, 1])  # normalized over the batch
      (-1.0, 1.0)
      >>> int(state.get(bn.state_index).count), bn.averaging
      (1, 'debiased')
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
    # bnjax's options that differ from the core's defaults, as the core holds them, in
    # (name, value) pairs by name: static, hashable and one form per configuration, so
    # eqx.filter_jit compiles once per configuration.
    options: tuple[tuple[str, Any], ...] = eqx.field(static=True)

    def __init__(
        self,
        input_size: int,
        axis_name: Hashable | tuple[Hashable, ...],
        eps: float = 1e-5,
        channelwise_affine: bool = True,
        momentum: float = 0.99,
        inference: bool = False,
        dtype: Any = None,
        mode: str = "legacy",
        **options: Any,
    ):
        v.check_int("input_size", input_size, low=1, what="the number of channels")
        v.check_number("eps", eps, low=0.0)
        v.check_bool("channelwise_affine", channelwise_affine)
        v.check_bool("inference", inference)
        v.check_choice("mode", mode, ("ema", "batch", "legacy"))
        if mode == "legacy":
            warnings.warn(_LEGACY, UserWarning, stacklevel=2)
            mode = "ema"
        dtype = jax.dtypes.canonicalize_dtype(jnp.float64) if dtype is None else dtype
        self.input_size = input_size
        self.axis_name = _axis_name(axis_name)
        self.eps = eps
        self.channelwise_affine = channelwise_affine
        self.momentum = momentum
        self.inference = inference
        self.mode = mode
        self.dtype = v.float_dtype("dtype", dtype)
        # The core validates the options (and momentum) now, not at the first call; they are
        # kept as it holds them.
        core = self.core(self.dtype, **_options(mode, options))
        held = {name: getattr(core, name) for name in sorted(OPTIONS)}
        self.options = tuple(
            (name, value) for name, value in held.items() if value != OPTIONS[name]
        )
        shape = (input_size,)
        self.weight, self.bias = core.init(shape)[0]  # ones and zeros in dtype, or None
        stats = (jnp.zeros(shape, self.dtype), jnp.ones(shape, self.dtype))  # Equinox's dtype
        self.state_index = eqx.nn.StateIndex(BatchNormState(*stats, jnp.zeros((), jnp.int32)))

    def __getattr__(self, name: str) -> Any:
        """bnjax's options as attributes (``layer.averaging``): from :attr:`options`, else
        the core's default. Python asks only for what is not a field or method; any name but
        an option's is an AttributeError (so ``hasattr`` stays truthful)."""
        if name not in OPTIONS:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return dict(self.__dict__.get("options", ())).get(name, OPTIONS[name])

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
        core = self.core(out_dtype)
        params = BatchNormParams(scale=self.weight, bias=self.bias)
        stats = state.get(self.state_index)
        marker = self.state_index.marker  # make_with_state names it by the layer's path
        label = marker.removesuffix(".state_index") if isinstance(marker, str) else None
        with marks.label(label):  # the layer's path in audit findings
            y, new = core.apply(params, stats, x, training=not inference)
            if self.mode == "ema" and not inference:
                # y normalizes with the batch's statistics, new has them averaged in (at count
                # 0 taken whole: ema_from_first), so y is Equinox's first output, gradient
                # included. From the second batch on Equinox normalizes with new: an
                # inference pass, the affine map alone.
                y_running, _ = core.apply(params, new, x, training=False)
                y = jnp.where(stats.count == 0, y, y_running)
        return y, state if inference else state.set(self.state_index, new)

    def core(self, dtype, **options) -> Core:
        """The :class:`bnjax.BatchNorm` of a call whose output has ``dtype``.

        Args:
          dtype: the output dtype.
          **options: bnjax's options; none given: the layer's (:attr:`options`).

        Returns:
          The core with ``axis=0`` and the layer's settings.
        """
        return Core(
            axis=0,
            momentum=self.momentum,
            epsilon=self.eps,
            center=self.channelwise_affine,
            scale=self.channelwise_affine,
            axis_name=self.axis_name,
            dtype=dtype,
            param_dtype=self.dtype,
            **(options or dict(self.options)),
        )


def _axis_name(axis_name):
    """Equinox's ``axis_name``: a name, or a sequence of names (kept as a tuple)."""
    axis_name = tuple(axis_name) if isinstance(axis_name, list) else axis_name
    if axis_name is None or not isinstance(axis_name, Hashable):
        raise TypeError(
            f"axis_name must name the batch axis of the enclosing vmap or pmap (a hashable "
            f"such as 'batch', or a tuple of names); got {axis_name!r}"
        )
    return axis_name


def _options(mode: str, options: dict) -> dict:
    """bnjax's options for the core: ``options``, given the mode's ``averaging`` where it is
    None (in place), after the rules of an Equinox layer (the core checks the values)."""
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise TypeError(
            f"bnjax.equinox.BatchNorm got unexpected keyword argument(s) {unknown}; it takes "
            f"Equinox's arguments and bnjax's options {list(OPTIONS)}"
        )
    if options.get("averaging") is None:  # the running average of Equinox's mode
        options["averaging"] = MODE_AVERAGING[mode]
    elif mode == "ema" and options["averaging"] == "ema":
        raise ValueError(
            "averaging='ema' with mode='ema' is not supported: this mode takes the first batch "
            "whole, and 'ema' would blend it with the initial mean 0 and variance 1. Use "
            "averaging=None (Equinox's: 'ema_from_first'), 'debiased' or 'cumulative'"
        )
    for name, why in _UNSUPPORTED.items():
        if options.get(name) is not None:
            raise ValueError(f"{name}={options[name]!r} is not supported; expected None. {why}")
    renorm = options.get("renorm")
    if renorm is not None and mode != "batch":
        raise ValueError(
            f"renorm={renorm!r} needs mode='batch'; got mode={mode!r}, which normalizes with the "
            "running statistics in training already"
        )
    return options
