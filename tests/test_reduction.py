"""Masks and reductions (``bnjax._src.reduction``) against numpy."""

import jax.numpy as jnp
import numpy as np
import pytest
from reference import full_mask

from bnjax._src.reduction import Reduction, expand_mask

RNG = np.random.default_rng(3)


def test_expand_mask_shapes():
    shape, feat = (4, 5, 3), (2,)
    assert expand_mask(None, shape, feat) is None
    assert expand_mask(jnp.ones((4, 5), bool), shape, feat).shape == (4, 5, 1)
    assert expand_mask(jnp.ones((4,), bool), shape, feat).shape == (4, 1, 1)  # per example
    assert expand_mask(jnp.ones((3,), bool), shape, feat).shape == (1, 1, 3)  # numpy
    with pytest.raises(ValueError, match=r"mask of shape \(5,\) does not broadcast"):
        expand_mask(jnp.ones((5,), bool), shape, feat)  # the middle axis alone: (1, 5)
    assert expand_mask(jnp.ones((1, 5), bool), shape, feat).shape == (1, 5, 1)
    with pytest.raises(ValueError, match=r"ambiguous: read .* on axes \(2,\) .* on axes \(0,\)"):
        expand_mask(jnp.ones((3,), bool), (3, 5, 3), feat)
    # NHWC with a batch as wide as the image: one flag per example, not ambiguous
    assert expand_mask(jnp.ones((8,), bool), (8, 4, 8, 3), (3,)).shape == (8, 1, 1, 1)
    assert expand_mask(jnp.ones((4, 1), bool), shape, feat).shape == (4, 1, 1)
    assert expand_mask(jnp.ones((4, 5, 3), bool), shape, feat).shape == (4, 5, 3)
    assert expand_mask(jnp.ones((4, 5), bool), (2, 3, 4, 5), (1,)).shape == (1, 1, 4, 5)
    mask = RNG.random((2, 4, 5)) < 0.5
    got = expand_mask(jnp.asarray(mask), (2, 3, 4, 5), (1,))
    np.testing.assert_array_equal(
        np.broadcast_to(got, (2, 3, 4, 5)), full_mask(mask, (2, 3, 4, 5), 1)
    )


def test_expand_mask_refusals_name_the_mask():
    shape, feat = (4, 5, 3), (2,)
    with pytest.raises(TypeError, match=r"^mask must be a bool array; got dtype int32"):
        expand_mask(jnp.ones((4,), jnp.int32), shape, feat)
    with pytest.raises(TypeError, match=r"^mask must be a bool array; got dtype None"):
        expand_mask([True] * 4, shape, feat)
    with pytest.raises(ValueError, match=r"^mask of shape \(4, 5, 3, 1\) does not broadcast"):
        expand_mask(jnp.ones((4, 5, 3, 1), bool), shape, feat)  # more dimensions than x
    with pytest.raises(ValueError, match=r"^mask of shape \(4, 5, 2\) does not broadcast"):
        expand_mask(jnp.ones((4, 5, 2), bool), shape, feat)


def test_expand_mask_size_one_dimensions_are_never_ambiguous():
    """Dimensions of size 1 broadcast under every reading: only the others place a mask."""
    assert expand_mask(jnp.ones((1,), bool), (4, 4), (1,)).shape == (1, 1)
    assert expand_mask(jnp.ones((), bool), (4, 4), (1,)).shape == (1, 1)
    assert expand_mask(jnp.ones((4, 1), bool), (4, 4), (1,)).shape == (4, 1)
    assert expand_mask(jnp.ones((1, 4), bool), (4, 4), (1,)).shape == (1, 4)
    got = expand_mask(jnp.asarray([True, False, True, True]), (4, 3), (1,))
    np.testing.assert_array_equal(got, [[True], [False], [True], [True]])


def test_reduction_counts_sums_and_masks_match_numpy():
    x = RNG.normal(0.0, 1.0, (4, 5, 3)).astype(np.float32)
    mask = RNG.random((4, 5)) < 0.6
    red = Reduction((0, 1), expand_mask(jnp.asarray(mask), x.shape, (2,)))
    full = full_mask(mask, x.shape, 2)
    count = red.local_n(x.shape, jnp.float32)
    # A mask without a feature axis counts the same for every feature (kept size 1).
    np.testing.assert_array_equal(np.broadcast_to(count, (1, 1, 3)).ravel(), full.sum((0, 1)))
    (s,) = red.sums(jnp.asarray(x))
    np.testing.assert_allclose(np.ravel(s), np.where(full, x, 0).sum((0, 1)), rtol=1e-6)
    (m,) = red.masked(jnp.asarray(x))
    np.testing.assert_array_equal(m, np.where(full, x, 0))
    assert Reduction((0,)).local_n((6, 2), jnp.float32) == 6
