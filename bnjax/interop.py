"""Exact checkpoint conversion between bnjax and PyTorch, Keras, Haiku, Flax and Equinox.

>>> import numpy as np
>>> from bnjax import interop
>>> sd = {"running_mean": np.zeros(3, np.float32), "running_var": np.ones(3, np.float32),
...       "num_batches_tracked": np.array(5)}
>>> params, state = interop.from_torch(sd)
>>> int(state.count)
5
"""

from bnjax._src.equinox_interop import from_equinox, to_equinox
from bnjax._src.haiku_interop import from_haiku, to_haiku
from bnjax._src.interop import from_flax, from_keras, from_torch, to_flax, to_keras, to_torch

__all__ = [
    "from_equinox",
    "from_flax",
    "from_haiku",
    "from_keras",
    "from_torch",
    "to_equinox",
    "to_flax",
    "to_haiku",
    "to_keras",
    "to_torch",
]
