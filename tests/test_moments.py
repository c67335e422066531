"""Batch statistics (``bnjax._src.moments``) against numpy float64 references."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from reference import moments

from bnjax._src.moments import (
    FAST_RATIO,
    STATISTICS,
    Moments,
    accumulation_dtype,
    batch_moments,
    checked_moments,
    eager_choice,
    is_concrete,
    well_conditioned,
)
from bnjax._src.reduction import Reduction, expand_mask

RNG = np.random.default_rng(0)


@pytest.fixture(params=["checked", "branchless"])
def statistics(request):
    """Every moments test runs on both paths (``"auto"`` is one of them per platform)."""
    return request.param


def _moments(maybe_jit, x, mask=None, reduce_axes=(0,), statistics="checked"):
    """``batch_moments`` with the mask expanded as ``apply`` does, squeezed to features."""
    feat_axes = tuple(i for i in range(x.ndim) if i not in reduce_axes)

    def run(x, mask):
        m = expand_mask(mask, x.shape, feat_axes)
        mom = batch_moments(x, Reduction(reduce_axes, m), statistics=statistics)
        count = jnp.broadcast_to(mom.n, mom.var.shape)
        return count, mom.mean, mom.var

    feat = tuple(x.shape[a] for a in feat_axes)
    return [np.asarray(a).reshape(feat) for a in maybe_jit(run)(x, mask)]


def test_offset_data_variance_on_first_batch(maybe_jit, statistics):
    # The numerics contract asks for 1e-3 relative; the exact passes hold 1e-5 (measured ~3e-6: the
    # rounding of 4096 float32 terms).
    x = (1e3 + 0.1 * RNG.standard_normal((4096, 4))).astype(np.float32)
    _, mean_ref, var_ref = moments(x)
    _, mean, var = _moments(maybe_jit, jnp.asarray(x), statistics=statistics)
    np.testing.assert_allclose(var, var_ref, rtol=1e-5)
    # The mean of float32 data near 1e3 is exact to float32 resolution there (6e-5 ulp).
    np.testing.assert_allclose(mean, mean_ref, rtol=0, atol=6.2e-5)
    naive = np.mean(x * x, 0, dtype=np.float32) - np.mean(x, 0, dtype=np.float32) ** 2
    assert np.max(np.abs(naive - var_ref) / var_ref) > 1e-3  # E[x^2]-E[x]^2 would fail


def test_offset_data_variance_with_first_element_masked(maybe_jit, statistics):
    # A masked-out NaN first element changes nothing: it is no shift, and every masked-out
    # element is skipped.
    x = (1e3 + 0.1 * RNG.standard_normal((512, 3))).astype(np.float32)
    x[0] = np.nan
    mask = np.ones(512, bool)
    mask[0] = False
    _, mean_ref, var_ref = moments(x, mask=mask)
    _, mean, var = _moments(maybe_jit, jnp.asarray(x), jnp.asarray(mask), statistics=statistics)
    np.testing.assert_allclose(var, var_ref, rtol=1e-5)
    np.testing.assert_allclose(mean, mean_ref, rtol=0, atol=6.2e-5)


def test_channels_first_with_a_mask_per_element(maybe_jit, statistics):
    """NCHW, reduced over (0, 2, 3), each element masked on its own: per-feature counts in
    keep-dims shape."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 3, 2, 5)).astype(np.float32)
    mask = rng.random(x.shape) > 0.3
    n_ref, mean_ref, var_ref = moments(x, axis=1, mask=mask)
    count, mean, var = _moments(maybe_jit, jnp.asarray(x), jnp.asarray(mask), (0, 2, 3),
                                statistics=statistics)  # fmt: skip
    np.testing.assert_array_equal(count, n_ref)
    np.testing.assert_allclose(mean, mean_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(var, var_ref, rtol=1e-5)


@pytest.mark.parametrize("seed", range(4))
def test_exact_mean_adds_the_correction_to_the_pivot(maybe_jit, seed):
    # On data whose spread dwarfs its mean, the exact passes' pivot is off the mean by a
    # few rounding units of the spread, and ``delta`` corrects it: the mean they report
    # is within a tenth of a rounding unit of the spread (measured: at most 0.05). Without
    # the correction, or with it subtracted, the error is 0.4 to 1.0 such units.
    rng = np.random.default_rng(seed)
    x = (1.0 + 100.0 * rng.standard_normal((256, 8))).astype(np.float32)
    _, mean_ref, _ = moments(x)
    _, mean, _ = _moments(maybe_jit, jnp.asarray(x), statistics="branchless")
    spread = np.max(np.abs(x - mean_ref), axis=0)
    err = np.abs(mean - mean_ref) / (np.finfo(np.float32).eps * spread)
    assert np.max(err) < 0.1, err


@pytest.mark.parametrize("reduce_axes", [(0,), (0, 2), (0, 1, 2)])
def test_moments_match_reference(maybe_jit, reduce_axes, statistics):
    x = RNG.normal(3.0, 2.0, (6, 5, 4, 3)).astype(np.float32)
    axis = tuple(i for i in range(4) if i not in reduce_axes)
    n_ref, mean_ref, var_ref = moments(x, axis)
    n, mean, var = _moments(maybe_jit, jnp.asarray(x), None, reduce_axes, statistics)
    np.testing.assert_array_equal(n, n_ref)
    # float32 sums of at most 360 terms of size ~1: a few ulps of relative error.
    np.testing.assert_allclose(mean, mean_ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(var, var_ref, rtol=1e-5)


def test_masked_out_nan_and_inf_are_ignored(maybe_jit, statistics):
    x = RNG.normal(0.0, 1.0, (10, 2, 3)).astype(np.float32)
    mask = RNG.random((10, 2)) < 0.6
    mask[0, 0] = False  # the pivot candidate is masked out ...
    x[~mask] = np.nan  # ... and so is every NaN
    x[1, 1, 0] = np.inf
    mask[1, 1] = False
    n_ref, mean_ref, var_ref = moments(x, -1, mask)
    n, mean, var = _moments(maybe_jit, jnp.asarray(x), jnp.asarray(mask), (0, 1), statistics)
    np.testing.assert_array_equal(n, n_ref)
    np.testing.assert_allclose(mean, mean_ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(var, var_ref, rtol=1e-5)


def test_count_with_broadcast_and_per_feature_masks(maybe_jit, statistics):
    x = RNG.normal(0.0, 1.0, (4, 5, 3)).astype(np.float32)
    cases = [
        np.array([True, False, True, True]).reshape(4, 1),  # reduced shape, broadcast on 5
        np.array([True, True, False, True, False]).reshape(1, 5),  # on axis 1 only
        RNG.random((4, 5, 3)) < 0.5,  # Flax form: full shape, a different count per feature
        (RNG.random((4, 1, 1)) < 0.7) | np.eye(4, 1, dtype=bool)[:, :, None],  # full ndim
    ]
    for mask in cases:
        n_ref, mean_ref, var_ref = moments(x, -1, mask)
        n, mean, var = _moments(maybe_jit, jnp.asarray(x), jnp.asarray(mask), (0, 1), statistics)
        np.testing.assert_array_equal(n, n_ref)
        np.testing.assert_allclose(mean, mean_ref, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(var, var_ref, rtol=1e-5, atol=1e-7)


def test_fully_masked_feature_has_zero_count_and_statistics(maybe_jit, statistics):
    x = RNG.normal(0.0, 1.0, (6, 2)).astype(np.float32)
    x[:, 1] = np.nan
    mask = np.ones((6, 2), bool)
    mask[:, 1] = False
    n, mean, var = _moments(maybe_jit, jnp.asarray(x), jnp.asarray(mask), statistics=statistics)
    n_ref, mean_ref, var_ref = moments(x, -1, mask)
    np.testing.assert_array_equal(n, n_ref)
    assert n[1] == 0 and var[1] == 0 and mean[1] == 0  # pivot and delta 0
    np.testing.assert_allclose(mean[0], mean_ref[0], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(var[0], var_ref[0], rtol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_inputs_reduce_in_float32(maybe_jit, dtype, statistics):
    assert accumulation_dtype(dtype) == jnp.float32
    assert accumulation_dtype(jnp.float32) == jnp.float32
    x = jnp.asarray(RNG.normal(5.0, 2.0, (256, 3)), dtype)
    _, mean_ref, var_ref = moments(np.asarray(x.astype(jnp.float32)))

    def run(x):
        mom = batch_moments(x, Reduction((0,)), statistics=statistics)
        return mom.mean, mom.var

    mean, var = maybe_jit(run)(x)
    assert mean.dtype == jnp.float32 and var.dtype == jnp.float32
    # Exact inputs (the low-precision values themselves), float32 sums: float32 accuracy.
    np.testing.assert_allclose(np.ravel(mean), mean_ref, rtol=1e-6)
    np.testing.assert_allclose(np.ravel(var), var_ref, rtol=1e-5)


def _branch(maybe_jit, x, reduce_axes=(0,)):
    """The moments of both paths as numpy ``(mean, var)``, keyed by name, and whether the
    checked path took the plain sums (their moments are documented as ``pivot = mean``,
    ``delta = 0``, ``unit = 1``; the exact passes scale by a power of two near the spread)."""

    def run(x):
        red = Reduction(reduce_axes)
        return {
            "chosen": batch_moments(x, red, statistics="checked"),
            "branchless": batch_moments(x, red, statistics="branchless"),
        }

    out = maybe_jit(run)(x)
    got = {k: (np.asarray(m.mean).ravel(), np.asarray(m.var).ravel()) for k, m in out.items()}
    chosen = out["chosen"]
    got["took_plain"] = bool(np.all(np.asarray(chosen.delta) == 0) and np.all(chosen.unit == 1))
    return got


def _plain_sums_float32(x):
    """``E[x^2] - E[x]^2`` in float32, the textbook one-pass formula, in numpy."""
    x = np.asarray(x, np.float32)
    mean = x.mean(0, dtype=np.float32)
    return mean, (x * x).mean(0, dtype=np.float32) - mean * mean


@pytest.mark.parametrize("ratio", [0.0, 1.0, 1.99, 2.01, 3.0, 1e4])
def test_plain_sums_only_where_well_conditioned(maybe_jit, ratio):
    """Every feature's mean within 2 standard deviations (mean**2 <= 4 var): the plain sums;
    one feature beyond: the exact passes, for all. Both agree with float64 either way."""
    assert FAST_RATIO == 4.0
    z = RNG.standard_normal((2048, 3))
    z = (z - z.mean(0)) / z.std(0)  # exactly standardized in float64
    x = (0.1 * z + np.array([0.0, 0.05, 0.1 * ratio])).astype(np.float32)
    _, mean_ref, var_ref = moments(x)
    got = _branch(maybe_jit, jnp.asarray(x))
    fast = ratio**2 <= FAST_RATIO * 0.999  # float32 rounding of the standardized data
    assert got["took_plain"] == fast
    for name in ("chosen", "branchless"):
        mean, var = got[name]
        # The plain sums lose at most log2(1 + FAST_RATIO) bits: a few 1e-7 here.
        np.testing.assert_allclose(var, var_ref, rtol=5e-6, err_msg=name)
        np.testing.assert_allclose(mean, mean_ref, rtol=0, atol=1e-6 + 2e-7 * abs(ratio) * 0.1)
    if ratio == 1e4:  # the plain sums would have been useless there
        assert np.max(np.abs(_plain_sums_float32(x)[1] - var_ref) / var_ref) > 1e-2


def test_one_element_and_constant_features_take_the_exact_passes(maybe_jit):
    """Zero variance with a non-zero mean is not well conditioned: the exact passes return
    variance 0 and the mean exactly (the one-element batch normalizes to its bias)."""
    x = jnp.asarray([[-10.0, 0.0, 3.0]], jnp.float32)
    got = _branch(maybe_jit, x)
    np.testing.assert_array_equal(got["chosen"][0], [-10.0, 0.0, 3.0])
    np.testing.assert_array_equal(got["chosen"][1], [0.0, 0.0, 0.0])
    const = jnp.full((64, 2), 7.25, jnp.float32)
    np.testing.assert_array_equal(_branch(maybe_jit, const)["chosen"][1], [0.0, 0.0])
    # mean 0, var 0: the plain sums, exact zeros
    zeros = _branch(maybe_jit, jnp.zeros((8, 2), jnp.float32))
    np.testing.assert_array_equal(zeros["chosen"][0], [0.0, 0.0])
    np.testing.assert_array_equal(zeros["chosen"][1], [0.0, 0.0])


def test_vmap_over_centred_and_offset_batches(maybe_jit, statistics):
    """Under vmap the branch is chosen per member (lax.cond becomes a select): a centred
    and an offset member each get their own float64-accurate moments."""
    xs = np.stack(
        [
            RNG.normal(0.0, 1.0, (512, 3)),
            RNG.normal(1e3, 0.1, (512, 3)),
        ]
    ).astype(np.float32)

    def run(x):
        mom = batch_moments(x, Reduction((0,)), statistics=statistics)
        return mom.mean, mom.var

    mean, var = maybe_jit(jax.vmap(run))(jnp.asarray(xs))
    for i in range(2):
        _, mean_ref, var_ref = moments(xs[i])
        np.testing.assert_allclose(np.ravel(var[i]), var_ref, rtol=5e-6)
        np.testing.assert_allclose(np.ravel(mean[i]), mean_ref, rtol=2e-7, atol=1e-6)


def test_overflowing_plain_sums_take_the_exact_passes(maybe_jit):
    """float32 values near 1e19 square to infinity in the plain sums; the centred squares
    of the exact passes do not, and give the float64 variance."""
    x = (1e19 + 1e15 * RNG.standard_normal((256, 2))).astype(np.float32)
    _, mean_ref, var_ref = moments(x)
    got = _branch(maybe_jit, jnp.asarray(x))
    with np.errstate(over="ignore", invalid="ignore"):
        assert not np.all(np.isfinite(_plain_sums_float32(x)[1]))
    assert not got["took_plain"]
    for name in ("chosen", "branchless"):
        np.testing.assert_allclose(got[name][1], var_ref, rtol=1e-5)
        np.testing.assert_allclose(got[name][0], mean_ref, rtol=1e-6)


class _Device(NamedTuple):
    platform: str


class _OnDevices:
    """A concrete array stand-in that reports the devices it lives on."""

    def __init__(self, *platforms):
        self._devices = {_Device(p) for p in platforms}

    def devices(self):
        return self._devices


def test_eager_choice_follows_the_platform_of_concrete_arrays():
    """Op by op, ``"auto"`` is decided by where the arrays live: the checked path on CPU,
    the branchless one elsewhere, and ``"auto"`` (decide when lowered) for tracers, values
    without devices, or arrays on several platforms."""
    cpu = jnp.ones(3)
    assert eager_choice((cpu, jnp.zeros(2))) == "checked"
    assert eager_choice(_OnDevices("gpu")) == "branchless"
    assert eager_choice((_OnDevices("tpu"), _OnDevices("tpu"))) == "branchless"
    assert eager_choice((_OnDevices("cpu"), _OnDevices("gpu"))) == "auto"
    assert eager_choice(_OnDevices("cpu", "gpu")) == "auto"
    assert eager_choice((cpu, 2.0)) == "auto"  # a Python float has no devices
    jax.jit(lambda a: _assert(eager_choice(a) == "auto"))(cpu)
    assert is_concrete(cpu, (cpu, 2.0)) is True
    jax.jit(lambda a: _assert(is_concrete(cpu, a) is False))(cpu)


def _assert(condition):
    assert condition
    return 0


def test_well_conditioned_includes_its_boundary():
    """``mean**2 <= FAST_RATIO * var``: the plain sums at the boundary, not beyond it."""
    at = Moments(*(jnp.asarray([v], jnp.float32) for v in (2.0, 2.0, 0.0, 1.0, 1.0)))
    assert bool(well_conditioned(at))  # 2**2 == 4 * 1
    beyond = at._replace(pivot=jnp.asarray([2.0001], jnp.float32))
    assert not bool(well_conditioned(beyond))
    assert not bool(well_conditioned(at._replace(unit=jnp.asarray([jnp.inf], jnp.float32))))
    # {1, 3}: mean 2, variance 1, on the boundary: the plain moments (unit 1, no delta).
    mom = checked_moments(jnp.asarray([[1.0], [3.0]]), Reduction((0,)))
    for got, want in zip((mom.unit, mom.delta, mom.mean, mom.var), (1, 0, 2, 1), strict=True):
        np.testing.assert_array_equal(got, [[want]])


@pytest.mark.parametrize("offset", [1e3, 1e12, 1e17])
def test_checked_path_around_the_plain_mean_at_any_magnitude(maybe_jit, offset):
    """Offset data whose plain sums are finite take the second exact pass around the plain
    mean, scaled by ``2 * sqrt(sum(x**2))``: exact up to sums of squares near float32's
    maximum (1e17 squared, 256 times, is 2.6e36)."""
    x = (offset * (1 + 1e-3 * RNG.standard_normal((256, 2)))).astype(np.float32)
    _, mean_ref, var_ref = moments(x)
    got = _branch(maybe_jit, jnp.asarray(x))
    assert not got["took_plain"]
    np.testing.assert_allclose(got["chosen"][1], var_ref, rtol=1e-5)
    np.testing.assert_allclose(got["chosen"][0], mean_ref, rtol=1e-6)


@pytest.mark.parametrize("statistics", STATISTICS)
@pytest.mark.parametrize(
    "n, shape, x_spec, mask_spec",
    [
        (2, (2, 3), ("d", None), None),  # the batch axis, two elements, one per device
        (8, (64, 3), ("d", None), None),
        (4, (16, 4), (None, "d"), None),  # the features: the first row slices fine
        (8, (64, 3), (), ("d",)),  # x replicated, its mask split over the batch
        (4, (16, 3), ("d", None), ("d",)),
    ],
)
def test_explicit_sharding_of_a_reduced_axis(statistics, n, shape, x_spec, mask_spec):
    """Under explicit sharding JAX refuses to slice an axis split across devices, so the
    exact passes take no shift from a sharded reduced axis (of x or of the mask). The
    statistics still match float64, on offset data whose masked-out first row is a fill
    value far away (a shift by it would cost every digit of the variance)."""
    x = (1e3 + 0.1 * RNG.standard_normal(shape)).astype(np.float32)
    mask = None
    if mask_spec is not None:
        mask = RNG.random(shape[0]) < 0.7
        mask[0] = False
        x[~mask] = -1e9
    _, mean_ref, var_ref = moments(x, mask=mask)
    explicit = (jax.sharding.AxisType.Explicit,)
    mesh = jax.make_mesh((n,), ("d",), axis_types=explicit, devices=jax.devices()[:n])

    def run(x, mask):
        m = None if mask is None else expand_mask(mask, x.shape, (1,))
        mom = batch_moments(x, Reduction((0,), m), statistics=statistics)
        return mom.mean, mom.var

    with jax.sharding.set_mesh(mesh):
        xs = jax.device_put(x, NamedSharding(mesh, P(*x_spec)))
        ms = None if mask is None else jax.device_put(mask, NamedSharding(mesh, P(*mask_spec)))
        mean, var = jax.jit(run)(xs, ms)
    np.testing.assert_allclose(np.ravel(var), var_ref, rtol=1e-5)
    np.testing.assert_allclose(np.ravel(mean), mean_ref, rtol=0, atol=6.2e-5)
