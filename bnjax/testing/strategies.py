"""Hypothesis strategies for property tests of models built on bnjax (extra ``testing``).

>>> from bnjax.testing import strategies as bst
>>> from hypothesis import given, settings
>>> @settings(max_examples=3, deadline=None)
... @given(bst.configs(averaging="ema"))
... def test_momentum_is_kept(bn):
...     assert bn.averaging == "ema"
>>> test_momentum_is_kept()
"""

from bnjax._src.strategies import Inputs, configs, inputs, states

__all__ = ["Inputs", "configs", "inputs", "states"]
