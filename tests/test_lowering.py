"""Programs lowered for GPU and TPU hold no XLA conditional (``statistics="auto"``).

XLA:GPU runs a conditional by copying its predicate to the host and waiting for the
stream, so a BatchNorm program meant for an accelerator must have none. No accelerator is
needed to check: ``jax.export`` lowers for ``cuda``, ``rocm`` and ``tpu`` on any machine.
``lax.platform_dependent`` leaves a conditional on a constant index in the lowered module,
which any compiler folds; the module is canonicalized (as XLA would) before the data-dependent
conditionals (``stablehlo.case`` and ``stablehlo.if``) that remain are counted.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.interpreters import mlir
from jax.sharding import PartitionSpec as P

import bnjax
import bnjax.linen
import bnjax.nnx

try:  # the MLIR bindings that JAX ships
    from jax._src.lib.mlir import ir, passmanager
except ImportError:  # pragma: no cover
    from jaxlib.mlir import ir, passmanager

ACCELERATORS = ["cuda", "rocm", "tpu"]
X = jnp.asarray(np.random.default_rng(0).normal(3.0, 2.0, (16, 4, 4, 8)), jnp.float32)
MASK = jnp.asarray(np.random.default_rng(1).random((16,)) < 0.8)  # one flag per example


def conditionals(fn, *args, platform) -> int:
    """Data-dependent conditionals in ``jax.jit(fn)`` lowered for ``platform``."""
    exported = jax.export.export(jax.jit(fn), platforms=[platform])(*args)
    with mlir.make_ir_context():
        module = ir.Module.parse(exported.mlir_module())
        passmanager.PassManager.parse("builtin.module(canonicalize)").run(module.operation)
        text = str(module)
    return text.count("stablehlo.case") + text.count("stablehlo.if")


def _core(**config):
    """``(fn, args)`` programs of the core for one configuration, keyed by name."""
    bn = bnjax.BatchNorm(**config)
    params, state = bn.init(X)

    def forward(params, state, x, mask):
        return bn.apply(params, state, x, training=True, mask=mask)

    def forward_backward(params, state, x, mask):
        def loss(params, x):
            y, new = bn.apply(params, state, x, training=True, mask=mask)
            return jnp.sum(y * y), new

        return jax.grad(loss, argnums=(0, 1), has_aux=True)(params, x)

    def estimate(params, state, x, mask):
        return bn.apply(params, state, x, training=False, update_stats=True, mask=mask)

    programs = {"forward": forward, "forward_backward": forward_backward, "estimate": estimate}
    return {
        f"{name}{'_masked' if m is not None else ''}": (fn, (params, state, X, m))
        for name, fn in programs.items()
        for m in (None, MASK)
    }


def _shard_map_step():
    bn = bnjax.BatchNorm(axis_name="d")
    params, state = bn.init(X)
    auto = (jax.sharding.AxisType.Auto,)
    mesh = jax.make_mesh((4,), ("d",), axis_types=auto, devices=jax.devices()[:4])

    @functools.partial(jax.shard_map, mesh=mesh, in_specs=(P(), P(), P("d")), out_specs=(P(), P()))
    def step(params, state, x):
        def loss(params, x):
            y, new = bn.apply(params, state, x, training=True)
            return jax.lax.psum(jnp.sum(y * y), "d"), new

        grads, new = jax.grad(loss, has_aux=True)(params, x)
        return grads, new

    return step, (params, state, X)


def _linen_step():
    model = bnjax.linen.BatchNorm(use_running_average=False)
    variables = model.init(jax.random.key(0), X)

    def step(variables, x):
        def loss(params):
            y, updates = model.apply(
                {"params": params, "batch_stats": variables["batch_stats"]},
                x,
                mutable=["batch_stats"],
            )
            return jnp.mean(y * y), updates

        grads, updates = jax.grad(loss, has_aux=True)(variables["params"])
        params = jax.tree.map(lambda p, g: p - 0.1 * g, variables["params"], grads)
        return {"params": params, **updates}

    return step, (variables, X)


def _nnx_step():
    model = bnjax.nnx.BatchNorm(8, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)

    def step(state, x):
        def loss(state):
            model = nnx.merge(graphdef, state)
            y = model(x)
            return jnp.mean(y * y), nnx.state(model)

        grads, new = jax.grad(loss, has_aux=True)(state)
        return jax.tree.map(lambda p, g: p - 0.1 * g, new, grads)

    return step, (state, X)


def programs():
    """Every program named in the contract: core modes, masks, toolkit, wrappers."""
    out = dict(_core())
    ghost = _core(virtual_batch_size=4)
    out["ghost_forward_backward"] = ghost["forward_backward"]
    out["ghost_forward_backward_masked"] = ghost["forward_backward_masked"]
    renorm = _core(renorm=bnjax.Renorm(ramp_start=2, ramp_steps=10))
    out["renorm_forward_backward"] = renorm["forward_backward"]
    out["shard_map_axis_name_step"] = _shard_map_step()
    out["linen_train_step"] = _linen_step()
    out["nnx_train_step"] = _nnx_step()
    return out


PROGRAMS = programs()


@pytest.mark.parametrize("platform", ACCELERATORS)
@pytest.mark.parametrize("name", sorted(PROGRAMS))
def test_no_conditional_on_accelerators(name, platform):
    fn, args = PROGRAMS[name]
    assert conditionals(fn, *args, platform=platform) == 0


@pytest.mark.parametrize("platform", ACCELERATORS)
def test_checked_statistics_do_lower_to_a_conditional(platform):
    """The counter can fail: the checked path holds one conditional in the forward pass
    and one more in the backward pass, on every platform it is forced onto."""
    progs = _core(statistics="checked")
    fn, args = progs["forward"]
    assert conditionals(fn, *args, platform=platform) == 1
    fn, args = progs["forward_backward"]
    assert conditionals(fn, *args, platform=platform) == 2


def test_auto_is_checked_on_cpu_only():
    fn, args = _core()["forward_backward"]
    assert conditionals(fn, *args, platform="cpu") == 2
    fn, args = _core(statistics="branchless")["forward_backward"]
    assert conditionals(fn, *args, platform="cpu") == 0


def test_one_export_for_several_platforms_runs_each_path():
    """Exported once for CPU and CUDA, the program runs here with CPU's path and gives the
    same numbers as the branchless path would."""
    fn, args = _core()["forward"]
    exported = jax.export.export(jax.jit(fn), platforms=["cpu", "cuda"])(*args)
    y, state = exported.call(*args)
    fn_b, _ = _core(statistics="branchless")["forward"]
    y_b, state_b = jax.jit(fn_b)(*args)
    np.testing.assert_allclose(y, y_b, atol=1e-5)
    np.testing.assert_allclose(state.var, state_b.var, rtol=1e-5)


def test_flax_wrappers_expose_statistics():
    assert bnjax.linen.BatchNorm(statistics="checked").statistics == "checked"
    assert bnjax.nnx.BatchNorm(3, statistics="branchless", rngs=nnx.Rngs(0)).statistics == (
        "branchless"
    )
    with pytest.raises(ValueError, match="statistics"):
        bnjax.BatchNorm(statistics="fast")


def test_vmap_of_auto_on_cpu_equals_the_branchless_path():
    """Under ``jax.vmap`` ``"auto"`` on CPU is the checked path with its conditional batched
    (every branch runs, each example keeps its own): forward and backward give the numbers
    of the branchless path to float32 rounding, on centred and offset examples alike."""
    xs = jnp.stack([X, X * 0.01 + 1e3, -X])

    def run(statistics):
        fn, (params, state, _, _) = _core(statistics=statistics)["forward_backward"]
        return jax.jit(jax.vmap(lambda x: fn(params, state, x, None)))(xs)

    auto, branchless = run("auto"), run("branchless")
    # Gradients that cancel to 0 (sum(g * xhat) of a centred example) carry the rounding of
    # their terms: 2e-4 against terms of order 1 summed over the batch.
    for a, b in zip(jax.tree.leaves(auto), jax.tree.leaves(branchless), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-4)
