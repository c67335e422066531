"""Batch statistics: exact moments without data-dependent control flow, and a checked fast path.

Two ways to the same numbers, chosen by ``BatchNorm(statistics=...)``:

* ``"branchless"`` (:func:`exact_moments`): two passes over ``x``, each reading it once
  for a pair of sums that XLA:GPU and XLA:TPU fuse into one kernel. The first pass sums
  ``x - x0`` (``x0`` one counted element per feature) into a mean estimate ``pivot`` and
  takes ``max|x - x0|``; the second sums ``u = (x - pivot) / unit`` and ``u**2``, with
  ``unit`` a power of two of that maximum. The variance is ``sum(u**2) - sum(u)**2 / n``
  (the corrected two-pass formula): the second term is tiny because ``pivot`` is within a
  few rounding units of the mean, so nothing cancels on offset data, and the powers of two
  keep every square finite up to float32's largest inputs. The mean is held as ``pivot +
  delta``, twice float32's precision. No ``lax.cond``: the program is the same for every
  batch, which GPUs and TPUs need (an XLA:GPU conditional copies its predicate to the host).
* ``"checked"`` (:func:`checked_moments`): the plain sums ``sum(x)`` and ``sum(x**2)``
  first, which XLA:CPU reduces at the speed of a copy, and a ``lax.switch`` on them: when
  every feature has a finite variance and ``mean**2 <= FAST_RATIO * var`` they are used
  (at most two bits lost to cancellation); otherwise the second exact pass runs around the
  plain mean, or both exact passes if the plain sums overflowed.

``"auto"`` is resolved by :func:`resolved`, the one place a path is chosen: run op by op,
by the arrays' platform; traced, ``"checked"`` on CPU and ``"branchless"`` everywhere else,
at lowering time (``lax.platform_dependent``), so one jitted function exported for several
platforms gets each its own program. Across devices the sums are combined with ``psum``
(counts and sums add exactly), so masks and uneven shards give the statistics of one
device seeing the whole batch. ``benchmarks/NOTES.md`` has the measurements behind these
choices.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from bnjax._src.reduction import Reduction

STATISTICS = ("auto", "checked", "branchless")

# The checked path's condition: every feature has ``mean**2 <= FAST_RATIO * var``.
FAST_RATIO = 4.0


class Moments(NamedTuple):
    """Batch statistics of one call, in keep-dims shape (size 1 on reduced axes).

    Read them through :attr:`mean`, :attr:`var` and the methods; the fields are this
    module's representation. The mean is kept as ``pivot + delta``: ``pivot`` is the
    per-feature shift the sums were taken around and ``delta`` the batch mean's offset from
    it, so ``(x - pivot) - delta`` stays exact on data whose mean is large compared with
    its spread. The variance is kept in units of ``unit**2``, ``unit`` a power of two near
    the spread: ``scaled_var`` is finite (and exact) even where the variance itself is
    beyond float32's range (``|x|`` above about 1e19), so the batch still normalizes.

    Attributes:
      n: elements reduced per feature (after masking and across ``axis_name``).
      pivot: per-feature shift of the sums, identical on the devices of ``axis_name``.
      delta: mean minus pivot.
      scaled_var: biased variance divided by ``unit**2``.
      unit: per-feature power of two (1 for the plain sums).
    """

    n: jax.Array
    pivot: jax.Array
    delta: jax.Array
    scaled_var: jax.Array
    unit: jax.Array

    @property
    def mean(self) -> jax.Array:
        return self.pivot + self.delta

    @property
    def var(self) -> jax.Array:
        """The biased variance; infinite where it exceeds the dtype's range."""
        return self.scaled_var * self.unit * self.unit

    def offset_from(self, reference) -> jax.Array:
        """``mean - reference`` without rounding the mean first, in the wider dtype."""
        dtype = accumulation_dtype(self.pivot.dtype, reference.dtype)
        return (self.pivot.astype(dtype) - reference.astype(dtype)) + self.delta.astype(dtype)

    def rounded_shift(self):
        """The mean rounded, and the residual ``(pivot + delta) - mean``.

        Elementwise passes subtract the rounded mean (exact for elements near it) and move
        the residual, a fraction of a rounding unit of the mean, into their per-feature
        offsets, where it costs nothing per element and loses nothing on offset data.
        """
        mean = self.pivot + self.delta
        return mean, (self.pivot - mean) + self.delta

    def inverse_std(self, epsilon) -> jax.Array:
        """``1 / sqrt(var + epsilon)``, computed in units of ``unit``: exact wherever the
        variance itself overflows float32."""
        inv_unit = 1 / self.unit
        eps = jnp.asarray(epsilon, self.scaled_var.dtype) * inv_unit * inv_unit
        return lax.rsqrt(self.scaled_var + eps) * inv_unit

    def finite(self) -> jax.Array:
        """Per feature: the statistics were computed (mean and scaled variance finite)."""
        return jnp.isfinite(self.mean) & jnp.isfinite(self.scaled_var)

    def or_running(self, mean, var) -> Moments:
        """These moments, with the running ``mean``/``var`` for features that counted nothing."""
        counted = self.n > 0
        acc = self.pivot.dtype
        return Moments(
            n=self.n,
            pivot=jnp.where(counted, self.pivot, mean.astype(acc)),
            delta=jnp.where(counted, self.delta, 0),
            scaled_var=jnp.where(counted, self.scaled_var, var.astype(acc)),
            unit=jnp.where(counted, self.unit, 1),
        )


def accumulation_dtype(*dtypes) -> jnp.dtype:
    """The widest of float32 and ``dtypes``: statistics are reduced in at least float32.

    Chosen by width, not with ``jnp.promote_types``, which refuses to mix float widths
    (bfloat16 with float32) under ``jax_numpy_dtype_promotion="strict"``.
    """
    return max((jnp.dtype(jnp.float32), *map(jnp.dtype, dtypes)), key=lambda d: d.itemsize)


def path(statistics: str, *, named_axis: bool, vmapped: bool = False) -> str:
    """The statistics path for a call: ``statistics`` itself, except ``"branchless"`` for
    statistics computed under bnjax's own ``vmap`` (virtual batches, where a conditional
    would run every branch), and ``"auto"`` is ``"branchless"`` for statistics combined
    over a named axis (JAX cannot partially evaluate a conditional holding collectives of
    a ``vmap`` axis: ``grad(jit(vmap(f, axis_name=...)))`` would fail)."""
    if vmapped or (statistics == "auto" and named_axis):
        return "branchless"
    return statistics


def resolved(statistics: str, args, *, checked, branchless):
    """``checked(*args)`` or ``branchless(*args)``, as ``statistics`` says.

    The one rule that turns ``"auto"`` into a path: run op by op, the arrays' platform
    decides (:func:`eager_choice`); traced, the platform the program is lowered for
    (``lax.platform_dependent``: a program lowered for one platform holds only its branch,
    so the GPU and TPU programs have no conditional). The training pass's forward
    (:func:`batch_moments`) and backward each apply it inside the ``custom_vjp``: a choice
    made around it would be differentiated, and its index, kept for the backward, would
    be a conditional's operand in the GPU program of ``jax.grad(jax.jit(f))``.
    """
    path = eager_choice(args) if statistics == "auto" else statistics
    if path == "checked":
        return checked(*args)
    if path == "branchless":
        return branchless(*args)
    return lax.platform_dependent(*args, cpu=checked, default=branchless)


def eager_choice(arrays) -> str:
    """``"checked"`` or ``"branchless"`` for concrete ``arrays`` on one platform, else
    ``"auto"`` (traced: decided when lowered).

    Run op by op (no ``jax.jit``), the platform is known from the arrays' devices, and a
    conditional would be compiled anew at every call.
    """
    leaves = jax.tree.leaves(arrays)
    if not is_concrete(leaves) or not all(hasattr(a, "devices") for a in leaves):
        return "auto"
    platforms = {d.platform for a in leaves for d in a.devices()}
    if len(platforms) != 1:
        return "auto"
    return "checked" if platforms == {"cpu"} else "branchless"


def is_concrete(*arrays) -> bool:
    """True when no leaf of ``arrays`` is a tracer: the values can be read in Python."""
    return not any(isinstance(a, jax.core.Tracer) for a in jax.tree.leaves(arrays))


def batch_moments(x, red: Reduction, *, statistics: str = "auto") -> Moments:
    """Mean and biased variance of ``x`` over ``red`` (axes, mask, named axis).

    Args:
      x: the input, any float dtype; reduced in :func:`accumulation_dtype`.
      red: the :class:`Reduction`.
      statistics: ``"branchless"``, ``"checked"`` or ``"auto"`` (see the module docstring).

    Returns:
      :class:`Moments` in keep-dims shape. Features with no counted element get n 0,
      pivot and delta 0 and variance 0.
    """
    if red.mask is not None:  # a masked plain sum is no cheaper than the exact pass
        return exact_moments(x, red)
    checked = functools.partial(checked_moments, red=red)
    return resolved(
        statistics, (x,), checked=checked, branchless=functools.partial(exact_moments, red=red)
    )


def _first(a, axes):
    """``a`` at index 0 of each reduced axis (keep-dims): one element per feature.

    None where that would slice an axis sharded under explicit sharding (JAX cannot, short
    of gathering the whole array).
    """
    spec = getattr(getattr(jax.typeof(a), "sharding", None), "spec", None) or ()
    if any(i in axes and a.shape[i] > 1 and p is not None for i, p in enumerate(spec)):
        return None
    index = tuple(
        slice(0, 1) if i in axes and a.shape[i] > 1 else slice(None) for i in range(a.ndim)
    )
    return a[index]


def barrier_copies(x, acc, *per_feature):
    """``x`` in ``acc`` and ``per_feature`` values, all behind one optimization barrier.

    The conversion and the arithmetic a reduction does on the way (``x - pivot``) stay
    private to it: shared with another reduction (by common-subexpression elimination, of
    the conversion or of a broadcast per-feature value), XLA:CPU would write them to memory
    as full-size temporaries. Each reduction of a pass passes a different set of values,
    so that its barrier is not merged with another's. (XLA removes the barriers before
    fusion: on GPU and TPU the reductions of one pass still fuse into one read of ``x``.)
    """
    private = lax.optimization_barrier((x, *per_feature))
    return (private[0].astype(acc), *private[1:])


def _shift_element(x, red: Reduction, acc):
    """Per feature, the first counted element of ``x`` if it is finite, else 0."""
    x0 = _first(x, red.axes)
    if x0 is None:  # no element to be had cheaply: no shift
        return jnp.zeros((1,) * x.ndim, acc)
    x0 = x0.astype(acc)
    usable = jnp.isfinite(x0)
    if red.mask is not None:
        m0 = _first(red.mask, red.axes)
        usable = usable & (False if m0 is None else m0)
    return jnp.where(usable, x0, 0)  # a masked-out (or NaN) first element is no shift


def power_of_two(bound):
    """A power of two near ``bound`` (1 for 0), as ``(unit, 1 / unit)``, both exact.

    Values divided by it are below 4 in magnitude when ``|value| <= 2 * bound``: their
    squares neither overflow nor lose precision. Exponents are kept within float32's
    normal range (no flush-to-zero surprises on GPU and TPU).
    """
    _, e = jnp.frexp(bound)
    e = jnp.clip(e, -126, 126)
    one = jnp.ones_like(bound)
    return jnp.ldexp(one, e), jnp.ldexp(one, -e)


def centred_moments(x, red: Reduction, n, pivot, bound) -> Moments:
    """Pass two, one read of ``x``: the sums of ``u = (x - pivot) / unit`` and ``u**2``.

    The corrected two-pass formula ``m2 = sum(u**2) - sum(u)**2 / n`` loses nothing to
    cancellation because ``pivot`` is close to the mean (``sum(u)`` is tiny).
    """
    acc = n.dtype
    unit, inv_unit = power_of_two(bound)
    x1, p1, i1 = barrier_copies(x, acc, pivot, inv_unit)
    (x2,) = barrier_copies(x, acc)
    u1 = (x1 - p1) * i1
    u2 = (x2 - pivot) * inv_unit
    s1, s2 = red.psum(red.sums(u1, u2 * u2))
    inv_n = 1 / jnp.maximum(n, 1)
    delta_u = s1 * inv_n
    scaled_var = jnp.maximum(s2 - s1 * delta_u, 0) * inv_n
    return Moments(n, pivot, delta_u * unit, scaled_var, unit)


def exact_moments(x, red: Reduction) -> Moments:
    """The branchless statistics, two reads of ``x``.

    Pass one: ``pivot``, the mean to a few rounding units of ``|mean - x0|`` (``x0`` the
    first counted element, so offset data lose nothing), and ``bound >= max|x - pivot|``;
    pass two: :func:`centred_moments` around ``pivot``.
    """
    acc = accumulation_dtype(x.dtype)
    local = red.local_n(x.shape, acc)
    n = red.psum(local)
    x0 = _shift_element(x, red, acc)
    inv_n = 1 / jnp.maximum(n, 1)
    xs, x0s, inv_ns = barrier_copies(x, acc, x0, inv_n)
    xm, x0m = barrier_copies(x, acc, x0)
    masked = red.masked((xs - x0s) * inv_ns, jnp.abs(xm - x0m))
    s = jnp.sum(masked[0], axis=red.axes, keepdims=True)
    far = jnp.max(masked[1], axis=red.axes, keepdims=True)
    pivot = red.psum(s + x0 * (local * inv_n))
    # The bound only picks a power of two: no tangent (and pmax has no derivative rule).
    bound = red.pmax(lax.stop_gradient(far + jnp.abs(x0 - pivot)))
    return centred_moments(x, red, n, pivot, bound)


def well_conditioned(moments: Moments):
    """True when every feature has a finite ``var`` and ``mean**2 <= FAST_RATIO * var``.

    Then the plain sums are safe. A sum of squares that overflowed (``|x|`` near 1e19 in
    float32) gives an infinite variance that the exact passes, on scaled values, avoid.
    """
    var = moments.var
    return jnp.all((jnp.square(moments.mean) <= FAST_RATIO * var) & jnp.isfinite(var))


def checked_moments(x, red: Reduction) -> Moments:
    """The checked statistics (no mask): plain sums, then a ``lax.switch`` on them.

    Well conditioned: the plain moments. Otherwise, if the plain sums are finite, the
    second exact pass around the plain mean (``2 * sqrt(sum(x**2)) >= max|x - mean|``
    bounds it); if they overflowed, both exact passes. Each plain sum reads ``x`` through
    its own barrier: shared, the float32 conversion of a bfloat16 ``x`` would be written
    to memory in full and read back.
    """
    acc = accumulation_dtype(x.dtype)
    n = red.psum(red.local_n(x.shape, acc))
    (x1,), (x2, _) = barrier_copies(x, acc), barrier_copies(x, acc, n)
    s1 = jnp.sum(x1, axis=red.axes, keepdims=True)
    s2 = jnp.sum(x2 * x2, axis=red.axes, keepdims=True)
    s1, s2 = red.psum((s1, s2))
    inv_n = 1 / jnp.maximum(n, 1)
    mean = s1 * inv_n
    plain = Moments(n, mean, jnp.zeros_like(mean), s2 * inv_n - mean * mean, jnp.ones_like(mean))
    finite = jnp.all(jnp.isfinite(mean) & jnp.isfinite(s2))
    branch = jnp.where(well_conditioned(plain), 0, jnp.where(finite, 1, 2))
    branches = [
        lambda: plain,
        lambda: centred_moments(x, red, n, mean, 2 * jnp.sqrt(s2)),
        lambda: exact_moments(x, red),
    ]
    if is_concrete(branch):  # run op by op: no conditional to compile at every call
        return branches[int(branch)]()
    return lax.switch(branch, branches)
