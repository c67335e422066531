"""What the Flax wrappers share: argument mapping, output dtype, and one call of the core.

``bnjax.linen.BatchNorm`` and ``bnjax.nnx.BatchNorm`` keep their variables where Flax
keeps them (``params/{scale,bias}``, ``batch_stats/{mean,var}``) and do no maths of their
own: every call builds a :class:`bnjax.BatchNorm` from the Flax arguments and goes through
its ``apply``. This module holds that mapping.

The batch count that bnjax's state carries is stored (``batch_stats/count``, an int32
scalar) only when a setting reads it: ``averaging="debiased"`` or ``"cumulative"``,
``renorm`` or ``checks=True``. With the default ``averaging="ema"`` the variables are
exactly Flax's. A count missing from the variables (Flax's own, say) counts as 0 batches for
the running averages; the ``checks=True`` never-updated check fires only on a count of 0
with statistics still at their init values, so loaded statistics pass.

Masks are read as in the core (one rule, ``reduction.expand_mask``), which includes Flax's
numpy broadcasting; see :func:`run`.
"""

from __future__ import annotations

import dataclasses
import warnings

import jax
import jax.numpy as jnp

from bnjax._src import presets
from bnjax._src import validation as v
from bnjax._src.batchnorm import BatchNorm, OneElementWarning
from bnjax._src.moments import accumulation_dtype
from bnjax._src.types import BatchNormParams, BatchNormState

# The core's fields that Flax's own arguments set; every other field of bnjax.BatchNorm is
# one of bnjax's options, offered by the wrappers under the core's name and default.
FROM_FLAX = ("axis", "momentum", "epsilon", "center", "scale", "axis_name", "axis_index_groups",
             "dtype", "param_dtype", "scale_init", "bias_init")  # fmt: skip
OPTIONS = {f.name: f.default for f in dataclasses.fields(BatchNorm) if f.name not in FROM_FLAX}


def core_config(module, dtype, axis_name) -> BatchNorm:
    """The :class:`bnjax.BatchNorm` for a wrapper's attributes.

    Called with the module's own ``dtype`` and ``axis_name`` when the wrapper is built, so
    that every setting is validated there.

    Args:
      module: a wrapper (linen or nnx) with Flax's attribute names and the options of
        :data:`OPTIONS`.
      dtype: the output dtype of this call, or None to keep the input's.
      axis_name: the named axis for the statistics (the module's, or None while
        initializing).

    Returns:
      A validated :class:`bnjax.BatchNorm`.

    Raises:
      TypeError, ValueError: an attribute is invalid; the message names it.
    """
    for name in ("use_fast_variance", "force_float32_reductions"):
        v.check_bool(name, getattr(module, name, True))  # NNX has no force_float32_reductions
    # Flax's arguments map to the core as presets.flax maps them (use_bias is center, ...).
    named = ("axis", "momentum", "epsilon", "use_bias", "use_scale", "param_dtype")
    settings = {name: getattr(module, name) for name in named}
    groups = module.axis_index_groups if axis_name is not None else None
    core = presets.flax(**settings, axis_name=axis_name, axis_index_groups=groups, dtype=dtype)
    return dataclasses.replace(core, **{name: getattr(module, name) for name in OPTIONS})


def modes(use_running_average, update_stats) -> tuple[bool, bool]:
    """``(training, update)`` of a call: batch statistics unless ``use_running_average``,
    and the running statistics updated where ``update_stats`` says (by default in training).

    Raises:
      TypeError: either is not a Python bool (a traced value included); the message names it.
    """
    v.check_static_bool("use_running_average", use_running_average)
    update = not use_running_average if update_stats is None else update_stats
    v.check_static_bool("update_stats", update)
    return not use_running_average, update


def needs_count(core: BatchNorm) -> bool:
    """Whether a setting reads ``state.count``, so the wrappers must store it."""
    return core.averaging != "ema" or core.renorm is not None or core.checks


def run(core, scale, bias, stats: BatchNormState, x, *, training, update_stats, mask):
    """One call of the core on a wrapper's variables.

    The statistics are computed in at least float32 whatever dtype they are stored in;
    the new statistics come back in the stored dtypes.

    Args:
      core: the :class:`bnjax.BatchNorm` of this call.
      scale, bias: the parameters, each of the feature shape, or None where disabled.
      stats: the stored running statistics (``count`` None when not stored).
      x: the input, any shape with the feature axes of ``core.axis``.
      training: normalize with batch statistics (True) or the running ones.
      update_stats: average this batch into the running statistics.
      mask: None, or Flax's mask: any array-like (nonzero counts), taken as a bool array
        whose shape the core reads (``reduction.expand_mask``), one rule for the core and
        the wrappers: a mask Flax accepts means what it means in Flax, unless its lower
        rank also fits another reading (``(4,)`` against ``(4, 4)`` also reads as one flag
        per example; ``(N, H, W)`` against NCHW ``x`` with ``N == C``), which is refused
        rather than guessed. Masks of ``x``'s rank are never refused for that.

    Returns:
      ``(y, new_stats)``: the output and the statistics to store (``stats``' values when
      ``update_stats`` is False).

    Raises:
      TypeError, ValueError: an argument is invalid (``mask`` not convertible to an
        array, say); the message names it.
    """
    try:
        mask = None if mask is None else jnp.asarray(mask, jnp.bool_)
    except (TypeError, ValueError) as e:
        raise TypeError(
            f"mask must be an array broadcastable to x; got {type(mask).__name__} ({e})"
        ) from None
    acc = accumulation_dtype(stats.mean.dtype, stats.var.dtype)
    count = jnp.zeros((), jnp.int32) if stats.count is None else stats.count
    state = BatchNormState(mean=stats.mean.astype(acc), var=stats.var.astype(acc), count=count)
    params = BatchNormParams(scale, bias)
    with warnings.catch_warnings():
        # Flax is silent on a batch of one element per feature (the dummy batch of an
        # init, say), and a drop-in must be too; ``checks=True`` keeps the warning.
        if not core.checks:
            warnings.simplefilter("ignore", OneElementWarning)
        y, new = core.apply(
            params, state, x, training=training, update_stats=update_stats, mask=mask
        )
    new = jax.lax.stop_gradient(new)
    stored = (None if s is None else n.astype(s.dtype) for n, s in zip(new, stats, strict=True))
    return y, BatchNormState(*stored)  # in the stored dtypes; a count not stored stays None
