"""A user's step as a jaxpr over its array arguments, for :mod:`bnjax.testing`.

:func:`trace` turns ``fn(*args, **kwargs)`` into a closed jaxpr over the array leaves of
its arguments (other leaves stay static, as they would in a Python call), with the NNX
modules among the arguments returned after the call, so that their in-place updates are
outputs like any other; every input and output leaf gets a readable name. What flows
where in that jaxpr is bnjax/_src/dataflow.py's business.
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import sys
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

# The argument leaves traced as arrays: the others stay static, as in a Python call.
_ARRAYS = (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct)


@dataclasses.dataclass
class Traced:
    """A traced step.

    Attributes:
      jaxpr: the closed jaxpr.
      run: the flat function the jaxpr is of (array leaves in, array leaves out).
      in_names: a readable path for each input leaf (``bn_state['block1'].mean``).
      out_names: a readable path for each output leaf.
      dynamic: the input leaves (arrays or ``jax.ShapeDtypeStruct``).
      fn_name: the step's name.
    """

    jaxpr: Any
    run: Callable
    in_names: list[str]
    out_names: list[str]
    dynamic: list
    fn_name: str


def _graph_nodes(tree) -> list:
    """The NNX modules (graph nodes) among the leaves and nodes of ``tree``, if any."""
    nnx = sys.modules.get("flax.nnx")
    if nnx is None:
        return []

    def is_node(x):  # a module or optimizer; a Variable is a leaf of one
        return nnx.graph.is_graph_node(x) and not isinstance(x, nnx.Variable)

    return [n for n in jax.tree.leaves(tree, is_leaf=is_node) if is_node(n)]


def _root_names(fn, n_args: int) -> list[str]:
    """The names of ``fn``'s positional parameters where known, else ``args[i]``."""
    try:
        params = list(inspect.signature(fn).parameters.values())[:n_args]
    except (TypeError, ValueError):
        params = []
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    names = [p.name for p in itertools.takewhile(lambda p: p.kind in positional, params)]
    return names + [f"args[{i}]" for i in range(len(names), n_args)]


def _arrays(named_trees, types) -> tuple[list[str], list]:
    """The readable names and the values of the leaves of ``types`` in ``(root, tree)``
    pairs, in the order of the pairs and of ``jax.tree`` within each."""
    names, leaves = [], []
    for root, tree in named_trees:
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            if isinstance(leaf, types):
                names.append(root + jax.tree_util.keystr(tuple(path)))
                leaves.append(leaf)
    return names, leaves


def trace(fn: Callable, args: tuple, kwargs: dict) -> Traced:
    """``fn(*args, **kwargs)`` as a closed jaxpr over its array leaves; nothing runs.

    Args:
      fn: the step: any function of arrays, pytrees of arrays, NNX modules and static
        Python values.
      args, kwargs: its arguments; array leaves may be ``jax.ShapeDtypeStruct``.

    Returns:
      A :class:`Traced`. Its outputs are ``fn``'s array output leaves, then the leaves of
      the NNX modules among the arguments as they are after the call.
    """
    # Keyword arguments in sorted order, as jax.tree flattens a dict.
    named_args = [*zip(_root_names(fn, len(args)), args, strict=True), *sorted(kwargs.items())]
    in_names, dynamic = _arrays(named_args, _ARRAYS)
    out_names: list[str] = []

    def run(*arrays):
        it = iter(arrays)  # in the order of dynamic
        a, kw = jax.tree.map(lambda x: next(it) if isinstance(x, _ARRAYS) else x, (args, kwargs))
        out = fn(*a, **kw)
        nodes = [(f"module[{k}]", node) for k, node in enumerate(_graph_nodes((a, kw)))]
        names, outs = _arrays([("output", out), *nodes], jax.Array)
        out_names[:] = names
        return outs

    jaxpr = jax.make_jaxpr(run)(*dynamic)  # abstract: arrays and structs alike
    return Traced(jaxpr=jaxpr, run=run, in_names=in_names, out_names=list(out_names),
                  dynamic=dynamic, fn_name=getattr(fn, "__name__", repr(fn)))  # fmt: skip
