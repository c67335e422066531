"""Hypothesis strategies for property tests of code built on ``bnjax.BatchNorm``.

:func:`configs` draws valid ``BatchNorm`` configurations, :func:`inputs` draws batches
(and masks) that a configuration accepts, and :func:`states` draws parameters and a
running state after a few training updates. Together they let a property test exercise
every mode of batch norm without spelling out which settings and shapes go together.

hypothesis is an optional dependency: ``pip install 'bnjax[testing]'``.

Example:
  A property that any configuration, batch and state satisfy: inference leaves the state
  alone.

  >>> import numpy as np
  >>> from hypothesis import HealthCheck, given, settings
  >>> from hypothesis import strategies as st
  >>> from bnjax.testing import strategies as bst
  >>> @settings(max_examples=2, deadline=None, suppress_health_check=list(HealthCheck))
  ... @given(data=st.data(), bn=bst.configs(virtual_batch_size=None))
  ... def test_inference_keeps_state(data, bn):
  ...     x, mask = data.draw(bst.inputs(bn, max_side=4))
  ...     params, state = data.draw(bst.states(bn, x.shape, max_updates=2))
  ...     _, new = bn.apply(params, state, x, training=False, mask=mask)
  ...     for a, b in zip(new, state):
  ...         np.testing.assert_array_equal(a, b)
  >>> test_inference_keeps_state()
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bnjax._src import ghost
from bnjax._src import validation as v
from bnjax._src.batchnorm import BatchNorm, OneElementWarning
from bnjax._src.moments import STATISTICS
from bnjax._src.reduction import expand_mask
from bnjax._src.renorm import Renorm
from bnjax._src.types import BatchNormParams, BatchNormState

try:
    from hypothesis import strategies as st
except ImportError as e:
    _INSTALL = "bnjax.testing.strategies needs hypothesis: pip install 'bnjax[testing]'"
    raise ImportError(_INSTALL) from e

__all__ = ["Inputs", "configs", "inputs", "states"]

# configs() draws axes that some input of rank <= _CONFIG_RANK fits: inputs()'s default.
_CONFIG_RANK = 4
_FLOATS = (jnp.dtype(jnp.float32), jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16))
# Per dtype, the powers of ten of the spread and the largest of |offset| / spread: every
# value stays finite, and the offset still leaves a few significant digits of spread.
_RANGES = {"float32": (-3, 3, 6), "bfloat16": (-3, 3, 2), "float16": (-2, 2, 2)}
# The z of each kind of values, from numpy's generator.
_NOISE = {
    "normal": lambda rng, shape: np.clip(rng.standard_normal(shape), -4.0, 4.0),
    "uniform": lambda rng, shape: rng.uniform(-1.7, 1.7, shape),
    "ties": lambda rng, shape: rng.integers(-2, 3, shape).astype(np.float64),
    "constant": lambda rng, shape: np.zeros(shape),
}
# Seeds of the numpy noise: hypothesis draws (and shrinks) one seed, numpy draws a whole
# array from it, far faster than hypothesis drawing each element.
SEEDS = st.integers(0, 2**32 - 1)
# Batch renormalization: limits at and above their smallest, short ramps.
_LIMITS = {"rmax": st.just(1.0) | st.floats(1.0, 5.0), "dmax": st.just(0.0) | st.floats(0.0, 5.0)}
_RENORMS = st.builds(Renorm, **_LIMITS, ramp_start=st.integers(0, 3), ramp_steps=st.integers(0, 3))
# The BatchNorm fields that configs() draws on their own (axis follows virtual_batch_size).
_FIELDS = {
    "momentum": st.sampled_from((0.0, 0.9, 0.99, 1.0)) | st.floats(0.0, 1.0),
    "epsilon": st.sampled_from((0.0, 1e-5, 1e-3)) | st.floats(1e-8, 10.0),
    **dict.fromkeys(("center", "scale", "skip_nonfinite"), st.booleans()),
    "averaging": st.sampled_from(v.AVERAGING),
    "running_var": st.sampled_from(v.RUNNING_VAR),
    "dtype": st.sampled_from((None, *_FLOATS)),
    "param_dtype": st.sampled_from(_FLOATS),
    "renorm": st.none() | _RENORMS,
    "statistics": st.sampled_from(STATISTICS),
}


class Inputs(NamedTuple):
    """A batch for ``BatchNorm.apply``, drawn by :func:`inputs`.

    Attributes:
      x: a float array whose shape fits the configuration.
      mask: None, or a bool array that ``apply`` reads one way only: of ``x``'s shape,
        of ``x``'s rank with some dimensions 1 (broadcast), or ``x``'s leading
        dimensions (one flag per example).
    """

    x: jax.Array
    mask: jax.Array | None


def configs(**fixed: Any) -> st.SearchStrategy[BatchNorm]:
    """Valid ``BatchNorm`` configurations, covering every mode.

    The draws cover ``axis`` (ints and tuples, positive and negative, in any order),
    ``momentum`` in [0, 1], ``epsilon`` (0 included), ``center``, ``scale``,
    ``averaging``, ``running_var``, batch renormalization with its limits and ramp,
    ``virtual_batch_size``, ``statistics``, ``skip_nonfinite``, ``dtype`` (None,
    float32, float16, bfloat16) and ``param_dtype``. ``axis_name`` is None (a named axis
    needs its ``jax.vmap``/``shard_map``/``pmap`` around ``apply``: fix it with
    ``configs(axis_name="batch")`` and map yourself), ``checks`` is False,
    ``axis_index_groups``, ``scale_init`` and ``bias_init`` are None.

    Every drawn ``axis`` fits some input of rank at most 4 (what :func:`inputs` draws by
    default), with axis 0 a batch axis when ``virtual_batch_size`` is set.

    Args:
      **fixed: ``BatchNorm`` fields to hold at the given value instead of drawing them,
        e.g. ``configs(averaging="ema", renorm=None)``.

    Returns:
      A strategy of ``bnjax.BatchNorm``.

    Raises:
      TypeError: a keyword is not a ``BatchNorm`` field, or a fixed value has the wrong
        type (``BatchNorm``'s own message).
      ValueError: a fixed value is out of range (``BatchNorm``'s own message).

    Example:
      >>> from hypothesis import given, settings
      >>> from bnjax.testing import strategies as bst
      >>> @settings(max_examples=5, deadline=None)
      ... @given(bst.configs(averaging="cumulative"))
      ... def test_averaging(bn):
      ...     assert bn.averaging == "cumulative" and bn.axis_name is None
      >>> test_averaging()
    """
    fields = {f.name for f in dataclasses.fields(BatchNorm)}
    unknown = sorted(set(fixed) - fields)
    if unknown:
        raise TypeError(
            f"configs() got {unknown}, which are not BatchNorm fields; expected keywords "
            f"among {sorted(fields)}"
        )
    BatchNorm(**fixed)  # refuses a bad fixed value now, with BatchNorm's message
    return _configs(fixed)


@st.composite
def _configs(draw, fixed: dict[str, Any]) -> BatchNorm:
    config = dict(fixed)
    if "virtual_batch_size" not in fixed:
        sizes = (1, 2, 3)
        if "axis" in fixed:  # the sizes that fit an input as small as the axis allows
            axis = v.as_axes(fixed["axis"])
            # (rank 4 at least; a large axis may need more, searched up to rank 16)
            bound = max((_CONFIG_RANK, *_fitting_ranks(axis, None, 16)[:1]))
            sizes = [k for k in sizes if _fitting_ranks(axis, k, bound)]
        config["virtual_batch_size"] = draw(st.sampled_from((None, None, *sizes)))
    strategies = {"axis": _axes(config["virtual_batch_size"]), **_FIELDS}
    config.update({name: draw(s) for name, s in strategies.items() if name not in fixed})
    return BatchNorm(**config)


@st.composite
def _axes(draw, vbs: int | None):
    """Feature axes that fit a drawn rank, as an int or a tuple in any order and sign.

    At least one axis of that rank is reduced (two with ``virtual_batch_size=1``, whose
    axis 0 alone would hold one element per virtual batch), and axis 0 is reduced when
    ``vbs`` is set.
    """
    lowest = 3 if vbs == 1 else 2
    rank = draw(st.integers(lowest, _CONFIG_RANK))
    allowed = range(rank) if vbs is None else range(1, rank)
    most = rank - lowest + 1
    axes = draw(st.lists(st.sampled_from(allowed), min_size=1, max_size=most, unique=True))
    axes = [a - rank if draw(st.booleans()) else a for a in axes]
    return axes[0] if len(axes) == 1 and draw(st.booleans()) else tuple(axes)


def _fitting_ranks(axis, vbs: int | None, max_rank: int) -> tuple[int, ...]:
    """The ranks up to ``max_rank`` whose inputs ``axis`` and ``vbs`` fit, with a shape
    that has at least two elements per feature in each (virtual) batch."""
    return tuple(rank for rank in range(1, max_rank + 1) if _fits(axis, vbs, rank))


def _fits(axis, vbs: int | None, rank: int) -> bool:
    """Whether inputs of ``rank`` dimensions fit ``axis`` and ``vbs`` (see above)."""
    try:
        feat = v.feature_axes(axis, rank, shape=())  # (the shape only names x in messages)
    except ValueError:  # an axis out of range, or named twice
        return False
    # Reduced axes: two where a virtual batch of 1 would leave axis 0 alone; axis 0 among
    # them when there are virtual batches.
    return rank - len(feat) >= (2 if vbs == 1 else 1) and (vbs is None or 0 not in feat)


def inputs(config: BatchNorm, *, max_rank: int = 4, max_side: int = 6) -> st.SearchStrategy[Inputs]:
    """Batches that ``config.apply`` accepts, in training and in inference.

    The shape has a rank in ``[2, max_rank]`` that ``config.axis`` fits, dimensions in
    ``[1, max_side]`` (axis 0 a multiple of ``virtual_batch_size``, which may exceed
    ``max_side``), and at least two elements per feature in each (virtual) batch, so
    training never warns that the output equals ``bias``. The dtype is float32, float16
    or bfloat16. The values are ``offset + spread * z``: ``z`` normal, uniform, small
    integers (ties) or 0 (constant features), ``spread`` a power of ten, and ``offset``
    0 or up to 1e6 (float32) or 1e2 (16-bit) times the spread, the same for all features
    or per feature; large offsets are where a variance computed as ``E[x**2] - E[x]**2``
    fails. Every value is finite in the dtype.

    The mask is None or a bool array that ``apply`` reads unambiguously: of ``x``'s
    shape, of ``x``'s rank with some dimensions 1, or ``x``'s leading dimensions (one flag
    per example; only where no other reading fits). Each flag is True with probability
    0, 1/2, 4/5 or 1: all False, half, most examples kept, or all True.

    Args:
      config: the ``BatchNorm`` the batches are for.
      max_rank: the largest rank drawn.
      max_side: the largest dimension drawn (except axis 0 with ``virtual_batch_size``);
        at least 2.

    Returns:
      A strategy of :class:`Inputs` ``(x, mask)``.

    Raises:
      TypeError: ``config`` is not a ``BatchNorm``, or ``max_rank``/``max_side`` not ints.
      ValueError: ``max_side < 2``, or no rank up to ``max_rank`` fits ``config.axis``
        (with axis 0 a batch axis when ``virtual_batch_size`` is set).

    Example:
      >>> import numpy as np
      >>> from hypothesis import HealthCheck, given, settings
      >>> import bnjax
      >>> from bnjax.testing import strategies as bst
      >>> bn = bnjax.BatchNorm(axis=1, virtual_batch_size=2)
      >>> @settings(max_examples=5, deadline=None, suppress_health_check=list(HealthCheck))
      ... @given(bst.inputs(bn))
      ... def test_shapes(batch):
      ...     assert batch.x.shape[0] % 2 == 0 and batch.x.ndim >= 2
      ...     assert np.isfinite(np.asarray(batch.x, np.float32)).all()
      >>> test_shapes()
    """
    _check_config(config)
    v.check_int("max_rank", max_rank, low=1)
    v.check_int("max_side", max_side, low=2, what="a dimension of at least 2 elements")
    ranks = _fitting_ranks(config.axis, config.virtual_batch_size, max_rank)
    if not ranks:
        raise ValueError(
            f"no input of rank <= max_rank={max_rank} fits axis={config.axis!r} with "
            f"virtual_batch_size={config.virtual_batch_size!r} (distinct feature axes, a "
            "reduced axis, and axis 0 reduced when virtual_batch_size is set); expected a "
            "larger max_rank or another axis"
        )
    return _inputs(config, ranks, max_side)


@st.composite
def _inputs(draw, config: BatchNorm, ranks: tuple[int, ...], max_side: int) -> Inputs:
    vbs = config.virtual_batch_size
    dims = [draw(st.integers(1, max_side)) for _ in range(draw(st.sampled_from(ranks)))]
    if vbs is not None:
        dims[0] = vbs * draw(st.integers(1, max(1, max_side // vbs)))
    feat = v.feature_axes(config.axis, len(dims), dims)
    # Axis 0 counts vbs elements per virtual batch, the other reduced axes in full.
    others = [i for i in range(len(dims)) if i not in feat and (vbs is None or i != 0)]
    if (vbs or 1) * np.prod([dims[i] for i in others]) < 2:
        # _fitting_ranks kept a reduced axis besides axis 0 wherever vbs alone is < 2.
        dims[others[0]] = 2
    shape = tuple(dims)
    x = draw(values(shape, feat, draw(st.sampled_from(_FLOATS))))
    return Inputs(x=x, mask=draw(masks(shape, feat)))


@st.composite
def values(draw, shape: tuple[int, ...], feat: tuple[int, ...], dtype):
    """Values for :func:`inputs`: ``offset + spread * z`` in ``dtype``, every one finite.

    Args:
      shape: the shape of the array.
      feat: its feature axes (an offset may differ per feature).
      dtype: float32, float16 or bfloat16.
    """
    low, high, most = _RANGES[jnp.dtype(dtype).name]
    spread = 10.0 ** draw(st.integers(low, high))
    ratio = draw(st.none() | st.integers(0, most))
    offset = 0.0 if ratio is None else draw(st.sampled_from((1.0, -1.0))) * spread * 10.0**ratio
    kind = draw(st.sampled_from(tuple(_NOISE)))
    rng = np.random.default_rng(draw(SEEDS))
    z = _NOISE[kind](rng, shape)
    if draw(st.booleans()):  # the offset scaled per feature, in [-1, 1]
        offset *= rng.uniform(-1.0, 1.0, [d if i in feat else 1 for i, d in enumerate(shape)])
    # Cast on the host: jnp operations on every new shape would each compile.
    x = (offset + spread * z).astype(jnp.dtype(dtype))
    assert np.isfinite(x).all(), "the value ranges must keep x finite"
    return jnp.asarray(x)


@functools.lru_cache(maxsize=1024)
def _per_example(shape: tuple[int, ...], k: int, feat: tuple[int, ...]) -> bool:
    """Whether a mask of ``shape[:k]`` is read per example, and only so."""
    probe = jax.ShapeDtypeStruct(shape[:k], jnp.bool_)
    try:  # abstractly: expand_mask's own rule, without compiling a reshape
        read = jax.eval_shape(lambda m: expand_mask(m, shape, feat), probe)
    except ValueError:  # ambiguous: another reading fits too
        return False
    return read.shape == shape[:k] + (1,) * (len(shape) - k)


@st.composite
def masks(draw, shape: tuple[int, ...], feat: tuple[int, ...]):
    """Masks for :func:`inputs`: None, or a bool array that ``apply`` reads one way only.

    Args:
      shape: the shape of ``x``.
      feat: its feature axes.
    """
    kinds = [st.none(), st.just(shape), st.tuples(*(st.sampled_from((d, 1)) for d in shape))]
    leading = [shape[:k] for k in range(1, len(shape)) if _per_example(shape, k, feat)]
    mask_shape = draw(st.one_of(kinds + ([st.sampled_from(leading)] if leading else [])))
    if mask_shape is None:
        return None
    # Each flag True with probability 0, 1/2, 4/5 or 1.
    density = draw(st.sampled_from((0.0, 0.5, 0.8, 1.0)))
    return jnp.asarray(np.random.default_rng(draw(SEEDS)).random(mask_shape) < density)


def states(
    config: BatchNorm, shape, *, max_updates: int = 5
) -> st.SearchStrategy[tuple[BatchNormParams, BatchNormState]]:
    """Parameters and a running state after a few training updates.

    The parameters are those of ``config.init(shape)`` or random ones (scale around 1,
    either sign; bias around 0) in ``config.param_dtype``. The state is
    ``config.init(shape)``'s after ``k`` in ``[0, max_updates]`` calls of
    ``config.apply(..., training=True)`` (under ``jax.jit``) on float32 batches of
    ``shape`` drawn as :func:`inputs` draws values, without mask. Each draw compiles and
    runs those updates: add ``HealthCheck.too_slow`` to ``suppress_health_check``.

    Args:
      config: the ``BatchNorm`` the state is for.
      shape: the batches' shape (a tuple of ints), one ``config`` accepts in training.
      max_updates: the most updates before the state is returned.

    Returns:
      A strategy of ``(BatchNormParams, BatchNormState)``.

    Raises:
      TypeError: ``config`` is not a ``BatchNorm``, ``shape`` not a tuple of ints, or
        ``max_updates`` not an int.
      ValueError: ``max_updates < 0``, or ``config`` does not accept ``shape`` in training
        (``BatchNorm``'s own message: axes out of range, or axis 0 not a multiple of
        ``virtual_batch_size``).

    Example:
      >>> from hypothesis import HealthCheck, given, settings
      >>> import bnjax
      >>> from bnjax.testing import strategies as bst
      >>> bn = bnjax.BatchNorm(averaging="cumulative")
      >>> @settings(max_examples=3, deadline=None, suppress_health_check=list(HealthCheck))
      ... @given(bst.states(bn, (4, 3), max_updates=2))
      ... def test_count(drawn):
      ...     params, state = drawn
      ...     assert 0 <= int(state.count) <= 2 and state.mean.shape == (3,)
      >>> test_count()
    """
    _check_config(config)
    if not isinstance(shape, (tuple, list)) or any(
        isinstance(d, bool) or not isinstance(d, (int, np.integer)) for d in shape
    ):
        raise TypeError(f"shape must be a tuple of ints; got {shape!r} ({type(shape).__name__})")
    shape = tuple(int(d) for d in shape)
    v.check_int("max_updates", max_updates, low=0)
    feat = v.feature_axes(config.axis, len(shape), shape)
    if config.virtual_batch_size is not None:
        ghost.check_batch(config.virtual_batch_size, shape, set(range(len(shape))) - set(feat))
    return _states(config, shape, feat, max_updates)


@st.composite
def _states(draw, config: BatchNorm, shape, feat, max_updates: int):
    params, state = config.init(shape)
    if draw(st.booleans()):
        params = _random_params(params, draw(SEEDS))
    # The caller chose the shape; a one-element batch is still a valid update.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OneElementWarning)
        for _ in range(draw(st.integers(0, max_updates))):
            state = _train_update(config, params, state, draw(values(shape, feat, jnp.float32)))
    return params, state


@functools.partial(jax.jit, static_argnums=0)
def _train_update(config: BatchNorm, params, state, x):
    """One training update, compiled: an eager ``apply`` on a new shape compiles each of
    its operations and takes several times as long."""
    return config.apply(params, state, x, training=True)[1]


def _random_params(params: BatchNormParams, seed: int) -> BatchNormParams:
    """Each leaf 0.5 around its value, of either sign: ``init``'s ones and zeros become a
    scale around 1 of either sign and a bias around 0."""
    rng = np.random.default_rng(seed)

    def draw_like(p):
        return jnp.asarray(rng.choice([1.0, -1.0], p.shape) * rng.normal(p, 0.5), p.dtype)

    return jax.tree.map(draw_like, params)


def _check_config(config) -> None:
    if not isinstance(config, BatchNorm):
        raise TypeError(
            f"config must be a bnjax.BatchNorm; got {config!r} ({type(config).__name__})"
        )
