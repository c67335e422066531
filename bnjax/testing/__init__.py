"""Tools for users' own tests: catch a forgotten BatchNorm state update before training.

``audit`` traces a step and reports every BatchNorm whose new state is lost (nothing
runs); ``check_train_step`` and ``check_eval_step`` run it once and check the numbers.
``assert_eval_is_pure``, ``assert_jit_matches_eager``, ``assert_vmap_matches_loop`` and
``assert_scan_matches_loop`` check a model's ``apply`` against each property.
``bnjax.testing.strategies`` holds hypothesis strategies (``pip install 'bnjax[testing]'``).

>>> import jax, jax.numpy as jnp, bnjax, bnjax.testing
>>> bn = bnjax.BatchNorm()
>>> params, state = bn.init((8, 3))
>>> def train_step(params, state, x):
...     y, new_state = bn.apply(params, state, x, training=True)
...     return jnp.sum(y), new_state
>>> bnjax.testing.audit(train_step, params, state, jnp.ones((8, 3)), expect="train")
[]
"""

from bnjax._src.audit import Finding, audit
from bnjax._src.properties import (
    assert_eval_is_pure,
    assert_jit_matches_eager,
    assert_scan_matches_loop,
    assert_vmap_matches_loop,
)
from bnjax._src.step_checks import check_eval_step, check_train_step

__all__ = [
    "Finding",
    "assert_eval_is_pure",
    "assert_jit_matches_eager",
    "assert_scan_matches_loop",
    "assert_vmap_matches_loop",
    "audit",
    "check_eval_step",
    "check_train_step",
]
