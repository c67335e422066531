"""bnjax.equinox.BatchNorm against the real eqx.nn.BatchNorm, the core, and its converters."""

import dataclasses
import functools
import importlib
import inspect
import sys
import types
import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bnjax
import bnjax.equinox as bxe
import bnjax.testing
from bnjax import interop
from bnjax._src import equinox as wrapper

MODES = ["batch", "ema", "legacy"]


def _data(shape, seed=0, loc=0.5, scale=1.5):
    return jnp.asarray(np.random.default_rng(seed).normal(loc, scale, shape), jnp.float32)


def _key(seed):
    # "rbg" keys: threefry costs seconds of compilation per new shape on CPU.
    return jax.random.key(seed, impl="rbg")


def _make(cls, *args, **kwargs):
    """``make_with_state(cls)``, without the warning of mode="legacy" (tested on its own)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return eqx.nn.make_with_state(cls)(*args, **kwargs)


def _batched(layer, *, inference=None, axis_name="batch"):
    """The layer over a batch of examples: a named vmap with the state shared."""

    def call(x, state):
        if inference is None:  # a whole model need not take ``inference``
            return layer(x, state)
        return layer(x, state, inference=inference)

    return eqx.filter_vmap(call, axis_name=axis_name, in_axes=(0, None), out_axes=(0, None))


@eqx.filter_jit
def _run(layer, x, state, inference=None):
    """``_batched(layer)`` compiled once per layer structure (``inference`` is static)."""
    return _batched(layer, inference=inference)(x, state)


def _close(a, b, tol):
    assert jnp.shape(a) == jnp.shape(b)
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), atol=tol)


def _excess(momentum, n):
    """What Equinox's mode="batch" adds to the debiased running variance after n batches."""
    return momentum**n / (1 - momentum**n) if n else 0.0


# -- the interface --------------------------------------------------------------------


@pytest.mark.parametrize("method", ["__init__", "__call__"])
def test_takes_equinox_arguments_in_order_with_their_defaults(method):
    """Equinox's parameters, names, kinds and defaults, are a prefix of ours; beyond them
    only ``**options``. So any call that works with Equinox's works here."""
    theirs = list(inspect.signature(getattr(eqx.nn.BatchNorm, method)).parameters.values())
    ours = list(inspect.signature(getattr(bxe.BatchNorm, method)).parameters.values())
    # A new Equinox argument fails here until bnjax.equinox takes it too.
    assert [p.name for p in ours[: len(theirs)]] == [p.name for p in theirs], theirs
    for mine, p in zip(ours, theirs):  # noqa: B905 (ours may be longer)
        assert (mine.kind, mine.default) == (p.kind, p.default), p.name
    rest = [(p.name, p.kind) for p in ours[len(theirs) :]]
    assert rest == ([("options", inspect.Parameter.VAR_KEYWORD)] if method == "__init__" else [])


def test_equinox_s_positional_call_builds_the_same_layer():
    args = (4, "b", 1e-4, False, 0.9, True, jnp.float32, "batch")
    theirs = eqx.nn.BatchNorm(*args)
    ours = bxe.BatchNorm(*args)
    named = bxe.BatchNorm(4, "b", eps=1e-4, channelwise_affine=False, momentum=0.9,
                          inference=True, dtype=jnp.float32, mode="batch")  # fmt: skip
    for name in ("input_size", "axis_name", "eps", "channelwise_affine", "momentum",
                 "inference", "mode", "weight", "bias"):  # fmt: skip
        assert getattr(ours, name) == getattr(theirs, name) == getattr(named, name), name
    assert ours.dtype == named.dtype == jnp.float32 and ours.options == named.options


def test_bnjax_options_are_the_core_s_other_fields_forwarded():
    """Every field of bnjax.BatchNorm that Equinox's arguments do not set is an option,
    with the core's default; none is re-declared as a parameter or a field."""
    core = {f.name: f.default for f in dataclasses.fields(bnjax.BatchNorm)}
    assert set(wrapper.FROM_EQUINOX) | set(wrapper.OPTIONS) == set(core)
    assert all(default == core[name] for name, default in wrapper.OPTIONS.items())
    assert {"averaging", "renorm", "statistics", "checks"} <= set(wrapper.OPTIONS)
    fields = {f.name for f in dataclasses.fields(bxe.BatchNorm)}
    assert not fields & set(wrapper.OPTIONS)
    assert not set(inspect.signature(bxe.BatchNorm).parameters) & set(wrapper.OPTIONS)
    bn = bxe.BatchNorm(2, "b", mode="batch", statistics="branchless", checks=False)
    assert bn.options == (("averaging", "debiased"), ("statistics", "branchless"))
    for name, default in wrapper.OPTIONS.items():
        if name not in dict(bn.options):  # averaging None: the mode's own
            assert getattr(bn, name) == default, name
    core = bn.core(jnp.float32)
    assert (core.statistics, core.checks, core.axis, core.epsilon) == ("branchless", False, 0, 1e-5)
    assert _make(bxe.BatchNorm, 2, "b", mode="batch")[0].averaging == "debiased"
    assert _make(bxe.BatchNorm, 2, "b", mode="ema")[0].averaging == "ema_from_first"
    assert _make(bxe.BatchNorm, 2, "b", mode="ema", averaging="cumulative")[0].averaging == (
        "cumulative"
    )
    with pytest.raises(AttributeError, match="no attribute 'ema_state_index'"):
        bn.ema_state_index  # noqa: B018


def test_options_are_static_and_compile_once_per_configuration():
    """Equal settings built twice (a Renorm made twice, defaults given or not) are one
    static configuration: eqx.filter_jit traces once; another setting traces again."""
    traces = []

    @eqx.filter_jit
    def step(layer, x, state):
        traces.append(None)
        return _batched(layer)(x, state)

    x = _data((8, 3, 2))
    for checks in (None, False, None):
        given = {} if checks is None else {"checks": checks}
        bn, state = _make(bxe.BatchNorm, 3, "batch", mode="batch", renorm=bnjax.Renorm(),
                          **given)  # fmt: skip
        step(bn, x, state)
    assert len(traces) == 1
    other, state = _make(bxe.BatchNorm, 3, "batch", mode="batch", renorm=bnjax.Renorm(rmax=2.0))
    step(other, x, state)
    assert len(traces) == 2
    assert other.renorm == bnjax.Renorm(rmax=2.0) and other.core(jnp.float32).renorm.rmax == 2.0


def test_legacy_mode_warns_and_means_ema():
    with pytest.warns(UserWarning, match="mode='legacy'.*means mode='ema'"):
        bn = bxe.BatchNorm(3, "batch")
    assert bn.mode == "ema"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bxe.BatchNorm(3, "batch", mode="batch")


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"input_size": 0}, ValueError, r"input_size=0 .* >= 1"),
        ({"input_size": "3"}, TypeError, r"input_size must be an int .*'3'"),
        ({"axis_name": None}, TypeError, r"axis_name must name the batch axis.*got None"),
        ({"axis_name": {"a": 1}}, TypeError, r"axis_name .*\{'a': 1\}"),
        ({"eps": -1.0}, ValueError, r"eps=-1.0 is out of range"),
        ({"momentum": 1.5}, ValueError, r"momentum=1.5 is out of range.*\[0.0, 1.0\]"),
        ({"channelwise_affine": "yes"}, TypeError, r"channelwise_affine must be a Python bool"),
        ({"inference": 1}, TypeError, r"inference must be a Python bool; got 1"),
        ({"mode": "bogus"}, ValueError, r"mode='bogus' .*\['ema', 'batch', 'legacy'\]"),
        ({"dtype": jnp.int32}, TypeError, r"dtype must be a floating dtype; got int32"),
        ({"averaging": "mean"}, ValueError, r"averaging='mean' .*'debiased'"),
        ({"averaging": "ema", "mode": "ema"}, ValueError, r"averaging='ema' with mode='ema'"),
        ({"statistics": "fast"}, ValueError, r"statistics='fast'"),
        ({"virtual_batch_size": 4}, ValueError, r"virtual_batch_size=4 .*expected None"),
        ({"scale_init": jnp.ones}, ValueError, r"scale_init=.* expected None.*eqx.tree_at"),
        (
            {"renorm": bnjax.Renorm(), "mode": "ema"},
            ValueError,
            r"renorm=Renorm\(.*\) needs mode='batch'",
        ),  # fmt: skip
        ({"renorm": "yes"}, TypeError, r"renorm must be None or a bnjax.Renorm; got 'yes'"),
        ({"renorm": bnjax.Renorm}, TypeError, r"renorm must be None or a bnjax.Renorm"),
        ({"renorm_rmax": 2.0}, TypeError, r"unexpected keyword argument\(s\) \['renorm_rmax'\]"),
        ({"epsilon": 1e-3}, TypeError, r"\['epsilon'\]; it takes Equinox's arguments"),
    ],
)
def test_invalid_arguments_fail_when_built_naming_them(kwargs, error, match):
    args = {"input_size": 3, "axis_name": "batch", "mode": "batch", **kwargs}
    with pytest.raises(error, match=match):
        bxe.BatchNorm(**args)


def test_invalid_calls_name_the_problem():
    bn, state = _make(bxe.BatchNorm, 3, "batch", mode="batch")
    x = _data((4, 3, 2))
    with pytest.raises(ValueError, match=r"x has shape \(4, 2\); expected \(3, \.\.\.\)"):
        _batched(bn)(jnp.swapaxes(x, 0, 1), state)
    with pytest.raises(TypeError, match="inference must be a Python bool"):
        _batched(bn, inference=jnp.array(True))(x, state)
    with pytest.raises(TypeError, match="floating-point dtype"):
        _batched(bn)(jnp.ones((4, 3), jnp.int32), state)
    with pytest.raises(NameError, match="unbound axis name"):
        bn(x[0], state)  # outside the vmap that names the batch, as in Equinox


def test_missing_equinox_raises_an_import_error_naming_the_extra(monkeypatch):
    for name in ("bnjax.equinox", "bnjax._src.equinox"):
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "equinox", None)  # what an absent package looks like
    with pytest.raises(ImportError, match=r"pip install 'bnjax\[equinox\]'") as info:
        importlib.import_module("bnjax.equinox")
    assert isinstance(info.value.__cause__, ImportError)


# -- parity with eqx.nn.BatchNorm -------------------------------------------------------


def _pair(mode, **kwargs):
    theirs = _make(eqx.nn.BatchNorm, 3, "batch", mode=mode, **kwargs)
    ours = _make(bxe.BatchNorm, 3, "batch", mode=mode, **kwargs)
    return theirs, ours


def _affine(layer, seed):
    w, b = _data((3,), seed, 1.0, 0.3), _data((3,), seed + 1, 0.0, 0.5)
    return eqx.tree_at(lambda m: (m.weight, m.bias), layer, (w, b))


@pytest.mark.parametrize(
    ("mode", "jit"), [("batch", False), ("batch", True), ("ema", True), ("legacy", False)]
)
def test_matches_equinox_in_training_and_inference(mode, jit):
    """Three training steps on well-conditioned data: outputs to 1e-5 in training and in
    inference, and the running statistics; mode="batch" up to Equinox's documented
    excess of the running variance."""
    (eb, es), (bb, bs) = _pair(mode, momentum=0.9)
    eb, bb = _affine(eb, 1), _affine(bb, 1)
    run = (
        _run
        if jit
        else (lambda layer, x, s, inference=None: _batched(layer, inference=inference)(x, s))
    )
    for n in range(1, 4):
        x = _data((16, 3, 5), seed=n)
        ye, es = run(eb, x, es)
        yb, bs = run(bb, x, bs)
        _close(yb, ye, 1e-5)
        theirs = interop.from_equinox(eb, es)[1]
        ours = bs.get(bb.state_index)
        _close(ours.mean, theirs.mean, 1e-5)
        if mode == "batch":  # Equinox's variance started at 1, debiased as from 0
            _close(ours.var + _excess(0.9, n), theirs.var, 1e-5)
            assert int(ours.count) == int(theirs.count) == n
        else:
            _close(ours.var, theirs.var, 1e-5)
        # Inference with the same statistics: Equinox's, carried over exactly.
        _, same = interop.to_equinox(*interop.from_equinox(eb, es), bb, bs)
        ye, es_after = run(eb, x, es, True)
        _close(run(bb, x, same, True)[0], ye, 1e-5)
        if mode != "batch":  # the state itself gives Equinox's inference
            _close(run(eqx.nn.inference_mode(bb), x, bs)[0], ye, 1e-5)
        es = es_after


def test_batch_mode_inference_differs_by_the_documented_excess_only():
    (eb, es), (bb, bs) = _pair("batch", momentum=0.99)
    x = _data((16, 3, 5), seed=3)
    for n in range(1, 4):
        _, es = _run(eb, _data((16, 3, 5), seed=10 + n), es)
        _, bs = _run(bb, _data((16, 3, 5), seed=10 + n), bs)
    ye, _ = _run(eb, x, es, True)
    ours = bs.get(bb.state_index)
    excess = _excess(0.99, 3)  # 32.7: three batches in
    shifted = ours._replace(var=ours.var + excess)
    _, shifted_state = interop.to_equinox(interop.from_equinox(bb, bs)[0], shifted, bb, bs)
    _close(_run(bb, x, shifted_state, True)[0], ye, 1e-5)
    yb, _ = _run(bb, x, bs, True)
    assert float(jnp.max(jnp.abs(yb - ye))) > 1.0  # bnjax: the plain debiased average


@pytest.mark.parametrize("mode", ["batch", "ema"])
def test_gradients_match_equinox_where_documented(mode):
    """mode="batch": every step; mode="ema": the first batch exactly, later ones within
    the documented share of the running statistics (1e-3 to 4e-3 relative at 0.99)."""
    (eb, es), (bb, bs) = _pair(mode, momentum=0.99)
    eb, bb = _affine(eb, 2), _affine(bb, 2)
    g = _data((16, 3, 5), seed=99)

    @eqx.filter_jit
    def grads(layer, state, x):
        def loss(layer, x):
            y, new = _batched(layer)(x, state)
            return jnp.sum(y * g), new

        (_, new), (dlayer, dx) = eqx.filter_value_and_grad(lambda args: loss(*args), has_aux=True)(
            (layer, x)
        )
        return dx, dlayer.weight, dlayer.bias, new

    for step in range(2):
        x = _data((16, 3, 5), seed=20 + step)
        *theirs, es = grads(eb, es, x)
        *ours, bs = grads(bb, bs, x)
        if mode == "batch" or step == 0:
            for a, b in zip(ours, theirs, strict=True):
                _close(a, b, 1e-5)
        else:
            rel = float(jnp.linalg.norm(ours[0] - theirs[0]) / jnp.linalg.norm(theirs[0]))
            assert 1e-4 < rel < 1e-2, rel


def _full_size_reductions(jaxpr, size: int) -> int:
    """The reduce_sum/reduce_max equations over an operand of ``size`` elements or more,
    nested jaxprs (custom_vjp, cond branches, pjit) included."""
    count = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("reduce_sum", "reduce_max") and any(
            getattr(v.aval, "size", 0) >= size for v in eqn.invars
        ):
            count += 1
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            count += _full_size_reductions(sub, size)
    return count


@pytest.mark.parametrize("statistics", ["branchless", "checked"])
def test_ema_step_reduces_x_no_more_than_a_batch_step(statistics):
    """mode="ema" computes the batch statistics once, as mode="batch" does: its output
    from the second batch on (normalized with the new running statistics) is an affine map
    of x, with no reduction over it. (It used to compute them twice.)"""
    x = jnp.ones((16, 3, 5))
    counts = {}
    for mode in ("batch", "ema"):
        bn, state = _make(bxe.BatchNorm, 3, "batch", mode=mode, statistics=statistics)
        counts[mode] = _full_size_reductions(jax.make_jaxpr(_batched(bn))(x, state).jaxpr, x.size)
    assert 0 < counts["ema"] <= counts["batch"], counts


# -- Equinox's machinery ----------------------------------------------------------------


class CNN(eqx.Module):
    """conv -> BatchNorm -> relu -> conv -> BatchNorm -> relu -> mean -> linear."""

    layers: eqx.nn.Sequential
    head: eqx.nn.Linear

    def __init__(self, norm, key, mode="batch"):
        k1, k2, k3 = jax.random.split(key, 3)
        self.layers = eqx.nn.Sequential(
            [
                eqx.nn.Conv2d(1, 4, 3, padding=1, key=k1),
                norm(4, "batch", momentum=0.9, mode=mode),
                eqx.nn.Lambda(jax.nn.relu),
                eqx.nn.Conv2d(4, 6, 3, padding=1, key=k2),
                norm(6, "batch", momentum=0.9, mode=mode),
                eqx.nn.Lambda(jax.nn.relu),
            ]
        )
        self.head = eqx.nn.Linear(6, 10, key=k3)

    def __call__(self, x, state):
        h, state = self.layers(x, state)
        return self.head(jnp.mean(h, axis=(1, 2))), state


@eqx.filter_jit  # initializing op by op costs more than compiling it
def _make_cnn(norm, key, mode="batch"):
    return _make(CNN, norm, key, mode=mode)


def _cnn_step(optimizer):
    @eqx.filter_jit
    def step(model, state, opt_state, x, y):
        def loss(model):
            logits, new = _batched(model)(x, state)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new

        (_, new), grads = eqx.filter_value_and_grad(loss, has_aux=True)(model)
        updates, opt_state = optimizer.update(grads, opt_state, eqx.filter(model, eqx.is_array))
        return eqx.apply_updates(model, updates), new, opt_state

    return step


@pytest.mark.slow
def test_cnn_trains_three_steps_like_equinox():
    """Same parameters, training logits and statistics to 1e-4 (mode="batch"; the running
    variance up to Equinox's excess), and Equinox's inference logits from its statistics."""
    optimizer = optax.sgd(0.1)
    step = _cnn_step(optimizer)
    runs = {}
    for norm in (eqx.nn.BatchNorm, bxe.BatchNorm):
        model, state = _make_cnn(norm, _key(0))
        opt_state = optimizer.init(eqx.filter(model, eqx.is_array))
        for i in range(3):
            x, y = _data((8, 1, 6, 6), seed=i), jnp.arange(8) % 10
            model, state, opt_state = step(model, state, opt_state, x, y)
        x = _data((8, 1, 6, 6), seed=7)
        train_logits = _run(model, x, state)[0]
        runs[norm] = model, state, train_logits
    (em, es, elog), (bm, bs, blog) = runs[eqx.nn.BatchNorm], runs[bxe.BatchNorm]
    for a, b in zip(jax.tree.leaves(eqx.filter(bm, eqx.is_array)),
                    jax.tree.leaves(eqx.filter(em, eqx.is_array)), strict=True):  # fmt: skip
        _close(a, b, 1e-4)
    _close(blog, elog, 1e-4)
    for i in (1, 4):
        theirs = interop.from_equinox(em.layers[i], es)[1]
        ours = bs.get(bm.layers[i].state_index)
        _close(ours.mean, theirs.mean, 1e-4)
        _close(ours.var + _excess(0.9, 3), theirs.var, 1e-4)
        _, bs = interop.to_equinox(*interop.from_equinox(em.layers[i], es), bm.layers[i], bs)
    evaluate = functools.partial(_run, eqx.nn.inference_mode(em))
    _close(_run(eqx.nn.inference_mode(bm), x, bs)[0], evaluate(x, es)[0], 1e-4)


def test_vmap_over_examples_equals_one_batched_core_call():
    bn, state = _make(bxe.BatchNorm, 3, "batch", mode="batch", momentum=0.9)
    bn = _affine(bn, 3)
    core = bnjax.BatchNorm(axis=1, momentum=0.9, averaging="debiased")
    params = bnjax.BatchNormParams(scale=bn.weight, bias=bn.bias)
    core_state = state.get(bn.state_index)
    train = jax.jit(functools.partial(core.apply, training=True))
    for n in range(3):
        x = _data((8, 3, 4, 5), seed=30 + n, loc=100.0, scale=0.5)
        y, state = _run(bn, x, state)
        want, core_state = train(params, core_state, x)
        _close(y, want, 2e-6)
        for a, b in zip(state.get(bn.state_index), core_state, strict=True):
            _close(a, b, 2e-6)
    y, same = _run(bn, x, state, True)
    _close(
        y, jax.jit(functools.partial(core.apply, training=False))(params, core_state, x)[0], 2e-6
    )
    _equal(same, state)


def test_bnjax_options_and_several_axis_names_reach_the_core():
    """A tuple of axis names (nested vmaps) and bnjax's options mean what they mean in
    the core; checks=True warns on never-updated statistics, inside the vmap."""
    bn, state = _make(bxe.BatchNorm, 3, ["outer", "inner"], mode="batch", averaging="cumulative")
    assert bn.axis_name == ("outer", "inner")

    @eqx.filter_jit
    def both(x, state):
        inner = _batched(bn, axis_name="inner")
        return eqx.filter_vmap(inner, axis_name="outer", in_axes=(0, None), out_axes=(0, None))(
            x, state
        )

    core = bnjax.BatchNorm(axis=1, averaging="cumulative")
    core_state = state.get(bn.state_index)
    params = bnjax.BatchNormParams(scale=bn.weight, bias=bn.bias)
    for n in range(2):
        x = _data((8, 3, 4), seed=90 + n)
        y, state = both(x.reshape(2, 4, 3, 4), state)
        want, core_state = core.apply(params, core_state, x, training=True)
        _close(y.reshape(x.shape), want, 2e-6)
    for a, b in zip(state.get(bn.state_index), core_state, strict=True):
        _close(a, b, 2e-6)
    checked, fresh = _make(bxe.BatchNorm, 3, "batch", mode="batch", checks=True)
    with pytest.warns(bnjax.CheckWarning, match="never"):
        jax.block_until_ready(_run(checked, _data((8, 3, 4)), fresh, True))


def test_axis_index_groups_reaches_the_core_under_pmap():
    """An option the layer never names: forwarded, it works where JAX allows groups (pmap,
    one device here) and the core refuses it under vmap, naming it."""
    bn, state = _make(bxe.BatchNorm, 3, "d", mode="batch", axis_index_groups=[[0]])
    assert bn.axis_index_groups == ((0,),)
    x = _data((1, 3, 4))
    call = jax.pmap(lambda x, s: bn(x, s), axis_name="d", in_axes=(0, None), out_axes=(0, None))
    _, new = call(x, state)
    _close(new.get(bn.state_index).mean, jnp.mean(x[0], axis=1), 1e-6)
    with pytest.raises(NotImplementedError, match="axis_index_groups"):
        _batched(bn, axis_name="d")(x, state)


def test_sequential_inference_mode_and_filter_grad():
    model, state = _make(
        lambda key: eqx.nn.Sequential(
            [eqx.nn.Linear(4, 3, key=key), bxe.BatchNorm(3, "batch", mode="batch")]
        ),
        _key(1),
    )
    x = _data((8, 4), seed=5)
    y, state = _run(model, x, state)
    _close(jnp.mean(y, axis=0), jnp.zeros(3), 1e-6)  # batch statistics in training
    frozen = eqx.nn.inference_mode(model)
    assert frozen.layers[1].inference and not model.layers[1].inference
    y_eval, same = _run(frozen, x, state)
    _equal(same, state)

    @eqx.filter_grad
    def grads(model, x):
        return jnp.sum(_batched(model)(x, state)[0][:, 0])

    g = eqx.filter_jit(grads)(model, x)
    assert g.layers[1].weight.shape == (3,)
    np.testing.assert_allclose(g.layers[1].bias, [8.0, 0.0, 0.0], atol=1e-6)


class MLP(eqx.Module):
    """Linear -> BatchNorm -> relu -> linear: a small model for ensembles."""

    first: eqx.nn.Linear
    norm: bxe.BatchNorm
    head: eqx.nn.Linear

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.first = eqx.nn.Linear(4, 5, key=k1)
        self.norm = bxe.BatchNorm(5, "batch", momentum=0.9, mode="batch")
        self.head = eqx.nn.Linear(5, 2, key=k2)

    def __call__(self, x, state):
        h, state = self.norm(self.first(x), state)
        return self.head(jax.nn.relu(h)), state


@pytest.mark.slow
def test_ensemble_of_whole_models_by_filter_vmap():
    """Three models made and stepped (SGD) under an outer filter_vmap; the inner named
    vmap sees each member's batch only, as each member trained alone does."""
    optimizer = optax.sgd(0.1)
    step = _cnn_step(optimizer)  # any model(x, state) -> (logits, state)

    @eqx.filter_jit  # initializing op by op costs more than compiling it
    def make(key):
        model, state = eqx.nn.make_with_state(MLP)(key)
        return model, state, optimizer.init(eqx.filter(model, eqx.is_array))

    keys = jax.random.split(jax.random.key(2), 3)  # threefry: vmap-invariant
    x, y = _data((3, 8, 4), seed=40), jnp.stack([jnp.arange(8) % 2] * 3)
    models, states, opts = eqx.filter_jit(eqx.filter_vmap(make))(keys)
    models, states, _ = eqx.filter_jit(eqx.filter_vmap(step))(models, states, opts, x, y)
    for i in range(3):
        model, state, _ = step(*make(keys[i]), x[i], y[i])
        member = jax.tree.map(lambda a, i=i: a[i], eqx.filter(models, eqx.is_array))
        for a, b in zip(
            jax.tree.leaves(member), jax.tree.leaves(eqx.filter(model, eqx.is_array)), strict=True
        ):
            _close(a, b, 1e-6)
        ours = jax.tree.map(lambda a, i=i: a[i], states.get(models.norm.state_index))
        for a, b in zip(ours, state.get(model.norm.state_index), strict=True):
            _close(a, b, 1e-6)
        assert int(ours.count) == 1


def test_state_threads_through_lax_scan():
    bn, state = _make(bxe.BatchNorm, 3, "batch", mode="ema", momentum=0.8)
    xs = _data((5, 8, 3, 2), seed=50)

    def body(state, x):
        y, state = _batched(bn)(x, state)
        return state, y

    scanned, ys = jax.lax.scan(body, state, xs)
    for i in range(5):
        y, state = _run(bn, xs[i], state)
        _close(ys[i], y, 1e-6)
    for a, b in zip(scanned.get(bn.state_index), state.get(bn.state_index), strict=True):
        _close(a, b, 1e-6)
    assert int(scanned.get(bn.state_index).count) == 5


# -- checkpoint conversion --------------------------------------------------------------


def _trained(cls, mode, steps, **kwargs):
    bn, state = _make(cls, 3, "batch", mode=mode, momentum=0.9, **kwargs)
    bn = _affine(bn, 4)
    for i in range(steps):
        _, state = _run(bn, _data((8, 3, 2), seed=60 + i), state)
    return bn, state


def _equal(a, b):
    for u, w in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert u.dtype == w.dtype
        np.testing.assert_array_equal(np.asarray(u), np.asarray(w))


@pytest.mark.parametrize("steps", [0, 3])
def test_ema_layouts_round_trip_bit_for_bit(steps):
    bn, state = _trained(eqx.nn.BatchNorm, "ema", steps)
    params, bn_state = interop.from_equinox(bn, state)
    assert int(bn_state.count) == min(steps, 1)
    back, back_state = interop.to_equinox(params, bn_state, bn, state)
    _equal((back.weight, back.bias), (bn.weight, bn.bias))
    _equal(back_state, state)
    _equal(interop.from_equinox(back, back_state), (params, bn_state))
    ours, ours_state = _trained(bxe.BatchNorm, "batch", steps)
    _, moved = interop.to_equinox(*interop.from_equinox(ours, ours_state), ours, ours_state)
    _equal(moved, ours_state)


def test_batch_layout_round_trips_to_the_ulp_and_exactly_in_meaning():
    bn, state = _trained(eqx.nn.BatchNorm, "batch", 3)
    params, bn_state = interop.from_equinox(bn, state)
    _, back = interop.to_equinox(params, bn_state, bn, state)
    np.testing.assert_array_equal(back.get(bn.batch_counter), state.get(bn.batch_counter))
    for a, b in zip(back.get(bn.batch_state_index), state.get(bn.batch_state_index), strict=True):
        np.testing.assert_array_max_ulp(np.asarray(a), np.asarray(b), maxulp=1)
    _equal(interop.from_equinox(bn, back), (params, bn_state))  # what Equinox normalizes with
    again = interop.from_equinox(*interop.to_equinox(params, bn_state, bn, state))[1]
    for a, b in zip(again[:2], bn_state[:2], strict=True):
        np.testing.assert_array_max_ulp(np.asarray(a), np.asarray(b), maxulp=1)


def test_a_converted_equinox_state_continues_as_equinox_does():
    """From Equinox's statistics, the debiased average carries its excess on exactly."""
    (eb, es), (bb, bs) = _pair("batch", momentum=0.9)
    for i in range(2):
        _, es = _run(eb, _data((16, 3, 5), seed=70 + i), es)
    _, bs = interop.to_equinox(*interop.from_equinox(eb, es), bb, bs)
    for i in range(3):
        x = _data((16, 3, 5), seed=80 + i)
        _, es = _run(eb, x, es)
        _, bs = _run(bb, x, bs)
        _close(_run(bb, x, bs, True)[0], _run(eb, x, es, True)[0], 1e-5)


def test_converters_refuse_what_does_not_fit():
    bn, state = _trained(eqx.nn.BatchNorm, "batch", 1)
    params, bn_state = interop.from_equinox(bn, state)
    with pytest.raises(TypeError, match="bn_module must be an eqx.nn.BatchNorm .*got dict"):
        interop.from_equinox({}, state)
    with pytest.raises(ValueError, match="count=5 is given, but this layer .*keeps its own"):
        interop.from_equinox(bn, state, count=5)
    with pytest.raises(ValueError, match=r"bn_state.mean has shape \(4,\); expected \(3,\)"):
        interop.to_equinox(params, bn_state._replace(mean=jnp.zeros(4)), bn, state)
    with pytest.raises(ValueError, match=r"params.scale is None; expected an array"):
        interop.to_equinox(params._replace(scale=None), bn_state, bn, state)
    plain, plain_state = _make(eqx.nn.BatchNorm, 3, "batch", mode="ema", channelwise_affine=False)
    with pytest.raises(ValueError, match="channelwise_affine=False"):
        interop.to_equinox(params, bn_state, plain, plain_state)
    with pytest.raises(ValueError, match="count=2, but this layer has seen no batch"):
        interop.from_equinox(plain, plain_state, count=2)
    assert int(interop.from_equinox(*_trained(eqx.nn.BatchNorm, "ema", 1), count=7)[1].count) == 7


# -- the audit ------------------------------------------------------------------------


def test_audit_finds_a_dropped_equinox_state_update():
    model, state = _make_cnn(bxe.BatchNorm, _key(3))
    x = jax.ShapeDtypeStruct((8, 1, 6, 6), jnp.float32)

    def good_step(model, state, x):
        logits, state = _batched(model)(x, state)
        return jnp.sum(logits), state

    def forgetful_step(model, state, x):
        logits, _ = _batched(model)(x, state)  # the new state is never returned
        return jnp.sum(logits), state

    assert bnjax.testing.audit(good_step, model, state, x, expect="train") == []
    findings = bnjax.testing.audit(forgetful_step, model, state, x, expect="train")
    assert [f.kind for f in findings] == ["stale_state", "stale_state"]
    assert [f.where for f in findings] == ["CNN.layers.layers[1]", "CNN.layers.layers[4]"]
    evaluation = bnjax.testing.audit(
        lambda m, s, x: _batched(eqx.nn.inference_mode(m))(x, s), model, state, x, expect="eval"
    )
    assert evaluation == []


def test_fresh_batch_mode_layer_converts_at_count_zero():
    """Before its first batch, Equinox's batch mode divides its raw sums by 1, not by
    ``1 - momentum**0 = 0``; writing it back at count 0 leaves the sums as they were."""
    bn, state = _make(eqx.nn.BatchNorm, 3, "batch", mode="batch", momentum=0.9)
    params, bn_state = interop.from_equinox(bn, state)
    assert int(bn_state.count) == 0
    stats = bn_state._replace(mean=jnp.asarray([1.0, -2.0, 0.5]))
    _, back = interop.to_equinox(params, stats, bn, state)
    np.testing.assert_array_equal(back.get(bn.batch_state_index)[0], stats.mean)
    _equal(interop.from_equinox(bn, back), (params, stats))


def test_batch_mode_hidden_after_one_batch_and_in_bfloat16():
    bn, state = _make(eqx.nn.BatchNorm, 3, "batch", mode="batch", momentum=0.9)
    params, bn_state = interop.from_equinox(bn, state)
    mean = jnp.asarray([1.0, -2.0, 0.5])
    _, back = interop.to_equinox(
        params, bn_state._replace(mean=mean, count=jnp.asarray(1)), bn, state
    )
    np.testing.assert_allclose(back.get(bn.batch_state_index)[0], mean * (1 - 0.9), rtol=1e-6)
    bn16, state16 = eqx.nn.make_with_state(eqx.nn.BatchNorm)(
        3, "batch", mode="batch", momentum=0.5, dtype=jnp.bfloat16
    )
    stats16 = bn_state._replace(mean=mean.astype(jnp.bfloat16), var=jnp.ones(3, jnp.bfloat16),
                                count=jnp.asarray(2))  # fmt: skip
    params16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    _, back16 = interop.to_equinox(params16, stats16, bn16, state16)
    hidden = back16.get(bn16.batch_state_index)[0]
    assert hidden.dtype == jnp.bfloat16
    np.testing.assert_allclose(hidden.astype(np.float32), mean * 0.75, rtol=1e-2)


def test_a_strongly_typed_counter_is_written_as_one():
    """A state that went through a checkpoint holds a plain int32 counter, not Equinox's
    weakly typed one; the written counter must be of the same kind."""
    bn, state = _make(eqx.nn.BatchNorm, 3, "batch", mode="batch", momentum=0.9)
    strong = jax.tree.map(lambda a: jnp.asarray(np.asarray(a)), state)
    assert not strong.get(bn.batch_counter).weak_type
    params, bn_state = interop.from_equinox(bn, strong)
    _, back = interop.to_equinox(params, bn_state._replace(count=jnp.asarray(4)), bn, strong)
    counter = back.get(bn.batch_counter)
    assert int(counter) == 4 and not counter.weak_type


def test_converters_refuse_what_they_cannot_write():
    with pytest.raises(TypeError, match=r"^bn_module must be an eqx.nn.BatchNorm or a bnjax"):
        interop.from_equinox(types.SimpleNamespace(mode="batch"), None)
    bn, state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(
        3, "batch", mode="ema", channelwise_affine=False
    )
    _, bn_state = interop.from_equinox(bn, state)
    for params in (
        bnjax.BatchNormParams(jnp.ones(3), None),
        bnjax.BatchNormParams(None, jnp.ones(3)),
    ):
        with pytest.raises(ValueError, match="channelwise_affine=False; expected BatchNormParams"):
            interop.to_equinox(params, bn_state, bn, state)


@pytest.mark.parametrize("mode", ["batch", "ema"])
def test_pytree_leaves_are_equinox_s(mode):
    """The same leaves as Equinox's layer, in order: every setting is static, so
    ``filter_jit``, optimizers and serialisation see what they see with Equinox's."""
    theirs = eqx.nn.make_with_state(eqx.nn.BatchNorm)(3, "batch", mode=mode)[0]
    renorm = bnjax.Renorm(rmax=2.0, ramp_steps=10) if mode == "batch" else None
    ours = eqx.nn.make_with_state(bxe.BatchNorm)(
        3, "batch", mode=mode, renorm=renorm, checks=True, statistics="branchless"
    )[0]

    def described(layer):
        return [
            (type(leaf).__name__, getattr(leaf, "shape", leaf)) for leaf in jax.tree.leaves(layer)
        ]

    assert described(ours) == described(theirs) == [
        ("ArrayImpl", (3,)), ("ArrayImpl", (3,)), ("str", "batch"), ("bool", False)
    ]  # fmt: skip


def test_one_dimensional_examples_and_a_scalar():
    layer, state = eqx.nn.make_with_state(bxe.BatchNorm)(3, "batch", mode="batch")
    x = _data((8, 3))
    y, _ = jax.vmap(layer, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(x, state)
    np.testing.assert_allclose(y, (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-5), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"^x has shape \(\); expected \(3, \.\.\.\)"):
        layer(jnp.asarray(1.0), state)
