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

``"auto"`` takes ``"checked"`` on CPU and ``"branchless"`` everywhere else, at lowering time
(``lax.platform_dependent``): one jitted function exported for several platforms gets each
its own program. Across devices the sums are combined with ``psum`` (counts and sums add
exactly), so masks and uneven shards give the statistics of one device seeing the whole
batch. ``benchmarks/NOTES.md`` has the measurements behind these choices.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import custom_batching, lax

from bnjax._src.reduction import Reduction
from bnjax._src.types import Moments

STATISTICS = ("auto", "checked", "branchless")

# The checked path's condition: every feature has ``mean**2 <= FAST_RATIO * var``.
FAST_RATIO = 4.0


def accumulation_dtype(*dtypes) -> jnp.dtype:
    """The widest of float32 and ``dtypes``: statistics are reduced in at least float32.

    Chosen by width, not with ``jnp.promote_types``, which refuses to mix float widths
    (bfloat16 with float32) under ``jax_numpy_dtype_promotion="strict"``.
    """
    return max((jnp.dtype(jnp.float32), *map(jnp.dtype, dtypes)), key=lambda d: d.itemsize)


def batch_moments(x, red: Reduction, *, statistics: str = "auto") -> Moments:
    """Mean and biased variance of ``x`` over ``red`` (axes, mask, named axis).

    Args:
      x: the input, any float dtype; reduced in :func:`accumulation_dtype`.
      red: the :class:`Reduction`.
      statistics: ``"branchless"``, ``"checked"`` or ``"auto"`` (see the module docstring).

    Returns:
      :class:`Moments` in keep-dims shape. Features with no counted element get count 0,
      pivot and delta 0 and variance 0.
    """
    count = red.psum(red.local_count(x.shape, accumulation_dtype(x.dtype)))

    def checked(x, count, mask):
        return checked_moments(x, red._replace(mask=mask), count)

    def branchless(x, count, mask):
        return exact_moments(x, red._replace(mask=mask), count)

    args = (x, count, red.mask)
    return by_statistics(statistics, checked, branchless, args, named_axis=red.axis_name)


def by_statistics(statistics, checked, branchless, args, *, named_axis=None):
    """``checked(*args)`` or ``branchless(*args)``, as ``statistics`` says.

    ``"auto"``: run op by op, the arrays' platform decides (:func:`eager_choice`); traced,
    the platform the program is lowered for (``lax.platform_dependent``), and on CPU the
    branchless function under ``jax.vmap`` (:func:`unless_vmapped`), unless a named axis
    is in use.
    """
    if statistics == "auto":
        statistics = eager_choice(args)
    if statistics == "checked":
        return checked(*args)
    if statistics == "branchless":
        return branchless(*args)
    cpu = checked if named_axis is not None else unless_vmapped(checked, branchless)
    return lax.platform_dependent(*args, cpu=cpu, default=branchless)


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


def unless_vmapped(fn, batched_fn):
    """``fn``, except under ``jax.vmap``, where ``jax.vmap(batched_fn)`` runs instead.

    A ``lax.cond`` whose predicate is batched runs both branches: under ``vmap`` the checked
    statistics cost the plain sums and the exact passes, the branchless ones only the
    latter (benchmarks/RESULTS.md, the vmap ensemble). Not for functions that use a named
    axis: the rule's own ``vmap`` cannot see the outer one's collectives.
    """
    wrapped = custom_batching.custom_vmap(fn)

    @wrapped.def_vmap
    def _rule(axis_size, in_batched, *args):
        in_axes = tuple(jax.tree.map(lambda b: 0 if b else None, in_batched))
        out = jax.vmap(batched_fn, in_axes=in_axes, axis_size=axis_size)(*args)
        return out, jax.tree.map(lambda _: True, out)

    # ``custom_vmap`` has no derivative of its own; forward mode (``jax.hessian`` of the
    # closed-form gradient) differentiates ``fn`` itself.
    @jax.custom_jvp
    def choose(*args):
        return wrapped(*args)

    choose.defjvp(lambda primals, tangents: jax.jvp(fn, primals, tangents))
    return choose


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


def _private(x, acc, *per_feature):
    """``x`` in ``acc`` and ``per_feature`` values, all behind one barrier, for one reduction.

    The conversion and the arithmetic a reduction does on the way (``x - pivot``) stay
    private to it: shared with another reduction (by common-subexpression elimination, of
    the conversion or of a broadcast per-feature value), XLA:CPU would write them to memory
    as full-size temporaries. Each reduction of a pass passes a different set of values,
    so that its barrier is not merged with another's. (XLA removes the barriers before
    fusion: on GPU and TPU the reductions of one pass still fuse into one read of ``x``.)
    """
    private = lax.optimization_barrier((x, *per_feature))
    return (private[0].astype(acc), *private[1:])


def centre_estimate(x, red: Reduction, local, count):
    """Pass one, one read of ``x``: ``(pivot, bound)`` per feature.

    ``pivot`` is the mean to a few rounding units of ``|mean - x0|`` (``x0`` the first
    counted element, so offset data lose nothing here), ``bound >= max|x - pivot|`` over
    the counted elements. ``local`` and ``count`` are this device's and the total counts.
    """
    acc = count.dtype
    x0 = _first(x, red.axes)
    if x0 is None:  # no element to be had cheaply: no shift
        x0 = jnp.zeros(count.shape, acc)
    else:
        x0 = x0.astype(acc)
        usable = jnp.isfinite(x0)
        if red.mask is not None:
            m0 = _first(red.mask, red.axes)
            usable = usable & (False if m0 is None else m0)
        x0 = jnp.where(usable, x0, 0)  # a masked-out (or NaN) first element is no shift
    inv_n = 1 / jnp.maximum(count, 1)
    xs, x0s, inv_ns = _private(x, acc, x0, inv_n)
    (s,) = red.sums((xs - x0s) * inv_ns)
    xm, x0m = _private(x, acc, x0)
    far = red.maximum(jnp.abs(xm - x0m))
    pivot = red.psum(s + x0 * (local * inv_n))
    return pivot, red.pmax(far + jnp.abs(x0 - pivot))


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


def centred_moments(x, red: Reduction, count, pivot, bound) -> Moments:
    """Pass two, one read of ``x``: the sums of ``u = (x - pivot) / unit`` and ``u**2``.

    The corrected two-pass formula ``m2 = sum(u**2) - sum(u)**2 / n`` loses nothing to
    cancellation because ``pivot`` is close to the mean (``sum(u)`` is tiny).
    """
    acc = count.dtype
    unit, inv_unit = power_of_two(bound)
    x1, p1, i1 = _private(x, acc, pivot, inv_unit)
    (x2,) = _private(x, acc)
    u1 = (x1 - p1) * i1
    u2 = (x2 - pivot) * inv_unit
    s1, s2 = red.psum(red.sums(u1, u2 * u2))
    inv_n = 1 / jnp.maximum(count, 1)
    delta_u = s1 * inv_n
    scaled_var = jnp.maximum(s2 - s1 * delta_u, 0) * inv_n
    return Moments(count, pivot, delta_u * unit, scaled_var, unit)


def exact_moments(x, red: Reduction, count) -> Moments:
    """The branchless statistics: :func:`centre_estimate`, then :func:`centred_moments`."""
    local = red.local_count(x.shape, count.dtype)
    pivot, bound = centre_estimate(x, red, local, count)
    return centred_moments(x, red, count, pivot, bound)


def plain_moments(x, red: Reduction, count) -> tuple[Moments, Any]:
    """Moments from ``sum(x)`` and ``sum(x**2)`` (returned too): two plain reductions.

    Each reads ``x`` through its own barrier: shared, the float32 conversion of a bfloat16
    ``x`` would be written to memory in full and read back.
    """
    acc = count.dtype
    (x1,), (x2, _) = _private(x, acc), _private(x, acc, count)
    s1, s2 = red.psum(red.sums(x1, x2 * x2))
    inv_n = 1 / jnp.maximum(count, 1)
    mean = s1 * inv_n
    var = s2 * inv_n - mean * mean
    return Moments(count, mean, jnp.zeros_like(mean), var, jnp.ones_like(mean)), s2


def well_conditioned(moments: Moments):
    """True when every feature has a finite ``var`` and ``mean**2 <= FAST_RATIO * var``.

    Then the plain sums are safe. A sum of squares that overflowed (``|x|`` near 1e19 in
    float32) gives an infinite variance that the exact passes, on scaled values, avoid.
    """
    var = moments.var
    return jnp.all((jnp.square(moments.mean) <= FAST_RATIO * var) & jnp.isfinite(var))


def checked_moments(x, red: Reduction, count) -> Moments:
    """The checked statistics: plain sums, then a ``lax.switch`` on their conditioning.

    Well conditioned: the plain moments. Otherwise, if the plain sums are finite, the
    second exact pass around the plain mean (``2 * sqrt(sum(x**2)) >= max|x - mean|``
    bounds it); if they overflowed, both exact passes. With a mask, both exact passes
    directly: a masked plain sum is no cheaper than the first exact pass.
    """
    if red.mask is not None:
        return exact_moments(x, red, count)
    plain, s2 = plain_moments(x, red, count)
    finite = jnp.all(jnp.isfinite(plain.mean) & jnp.isfinite(s2))
    branch = jnp.where(well_conditioned(plain), 0, jnp.where(finite, 1, 2))
    branches = [
        lambda: plain,
        lambda: centred_moments(x, red, count, plain.mean, 2 * jnp.sqrt(s2)),
        lambda: exact_moments(x, red, count),
    ]
    if is_concrete(branch):  # run op by op: no conditional to compile at every call
        return branches[int(branch)]()
    return lax.switch(branch, branches)
