"""Training building blocks for models that use bnjax: state, steps, checkpoints.

>>> import optax, bnjax
>>> from bnjax.training import TrainState
>>> params, bn_state = bnjax.BatchNorm().init((4, 3))
>>> state = TrainState.create(params, bn_state, optax.sgd(0.1))
"""

from bnjax._src.checkpoint import restore, save
from bnjax._src.train_state import TrainState
from bnjax._src.train_step import make_eval_step, make_train_step

__all__ = [
    "TrainState",
    "make_eval_step",
    "make_train_step",
    "restore",
    "save",
]
