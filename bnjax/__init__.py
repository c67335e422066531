"""bnjax: batch normalization for JAX with explicit state and exact numerics.

>>> import bnjax, jax.numpy as jnp
>>> bn = bnjax.BatchNorm()
>>> params, state = bn.init((8, 3))
>>> y, state = bn.apply(params, state, jnp.ones((8, 3)), training=True)
"""

from bnjax import interop, presets
from bnjax._src.batchnorm import BatchNorm, OneElementWarning
from bnjax._src.checks import CheckWarning
from bnjax._src.fold import fold_into_conv, fold_into_dense
from bnjax._src.recalibrate import recalibrate
from bnjax._src.renorm import Renorm
from bnjax._src.types import BatchNormParams, BatchNormState

__version__ = "0.1.0"

__all__ = [
    "BatchNorm",
    "BatchNormParams",
    "BatchNormState",
    "CheckWarning",
    "OneElementWarning",
    "__version__",
    "fold_into_conv",
    "fold_into_dense",
    "interop",
    "presets",
    "Renorm",
    "recalibrate",
]
