"""Sharding types under ``shard_map``: which manual mesh axes a value varies over.

Inside ``shard_map`` JAX tracks, for every value, the mesh axes it varies over. The
parameters and the running statistics are replicated while ``x`` varies per device; the
training pass marks them varying where ``x`` is, so that JAX sums their per-device
cotangents and every per-device result has one consistent type.
"""

from __future__ import annotations

import jax
from jax import lax


def _vma(a) -> frozenset:
    """The manual mesh axes that ``a`` varies over (empty outside ``shard_map``)."""
    mat = getattr(jax.typeof(a), "manual_axis_type", None)
    return frozenset(mat.varying) if mat is not None else frozenset()


def vary_like(leaf, like):
    """Marks ``leaf`` as varying over the manual mesh axes that ``like`` varies over.

    Inside ``shard_map`` the parameters are replicated while ``x`` varies per device. The
    gradient rule returns per-device parameter cotangents; declaring the parameters varying
    on the way in makes JAX sum those cotangents over devices on the way out, exactly as it
    does for any replicated value used with a per-device one.
    """
    if leaf is None:
        return None
    missing = tuple(sorted(_vma(like) - _vma(leaf), key=str))
    if not missing:
        return leaf
    return lax.pcast(leaf, missing, to="varying")
