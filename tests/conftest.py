"""Test-wide settings: several CPU devices, strict dtype promotion, hypothesis profiles,
the slow tier."""

import os

# Must precede the first import of jax anywhere in the test session.
_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("MPLBACKEND", "Agg")

import jax  # noqa: E402
import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "strict")

# CI: reproducible (derandomize: each property draws from a seed of its own, taken from
# its name), with per-test max_examples where a property compiles per example.
settings.register_profile(
    "ci",
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
)
settings.register_profile("dev", max_examples=100, deadline=None)
# Nightly-style, for local runs: HYPOTHESIS_PROFILE=thorough make test-all (hours).
settings.register_profile(
    "thorough",
    max_examples=500,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=False,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


# Two tiers (the `slow` marker): make test runs `-m "not slow"`, make test-all everything.
# A test taking maybe_jit runs under jax.jit in make test and also eagerly in make test-all
# (the tests parametrized by `jit` themselves mark their eager variant the same way).
@pytest.fixture(
    params=[pytest.param(False, id="eager", marks=pytest.mark.slow), pytest.param(True, id="jit")]
)
def maybe_jit(request):
    """Runs a test body eagerly and under ``jax.jit``: ``f = maybe_jit(f, static_argnames=...)``."""

    def wrap(fn, **jit_kwargs):
        return jax.jit(fn, **jit_kwargs) if request.param else fn

    return wrap


# Scripts, not tests: the golden-file generator needs PyTorch, and the mutation drivers
# run pytest themselves (pytest's --doctest-modules would import them).
collect_ignore_glob = ["golden/*.py", "mutants.py", "listed_mutants.py"]


# Doctests that draw and compile like a property (``apply`` for each drawn config and input)
# run in the slow tier, beside tests/test_strategies.py's reach tests.
SLOW_DOCTESTS = {"bnjax._src.strategies", "bnjax._src.strategies.inputs"}


def pytest_collection_modifyitems(items):
    for item in items:
        if isinstance(item, pytest.DoctestItem) and item.name in SLOW_DOCTESTS:
            item.add_marker(pytest.mark.slow)
