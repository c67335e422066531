"""A pytest plugin for Flax's own test suite: ``flax.linen.BatchNorm`` and
``flax.nnx.BatchNorm`` become bnjax's, and every test that constructs one is recorded.

Loaded with ``-p flax_swap`` before Flax's tests are collected, so module-level imports
(``from flax.nnx import BatchNorm``) see bnjax's classes too. No assertion is touched.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import flax.linen
import flax.linen.normalization
import flax.nnx
import flax.nnx.nn.normalization
import pytest

import bnjax.linen
import bnjax.nnx

for module in (flax.linen, flax.linen.normalization):
    module.BatchNorm = bnjax.linen.BatchNorm
for module in (flax.nnx, flax.nnx.nn.normalization):
    module.BatchNorm = bnjax.nnx.BatchNorm

_current = {"test": None}
_constructed: set[str] = set()
_outcomes: dict[str, str] = {}


def _record(cls):
    original = cls.__init__

    def __init__(self, *args, **kwargs):
        if _current["test"] is not None:
            _constructed.add(_current["test"])
        original(self, *args, **kwargs)

    __init__.__wrapped__ = original
    cls.__init__ = __init__


_record(bnjax.linen.BatchNorm)
_record(bnjax.nnx.BatchNorm)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    _current["test"] = item.nodeid
    yield
    _current["test"] = None


def pytest_runtest_logreport(report):
    """``failed`` if any phase failed, else ``skipped`` or ``passed`` from the call."""
    if report.failed:
        _outcomes[report.nodeid] = "failed"
    elif report.when == "call" or report.skipped:
        _outcomes.setdefault(report.nodeid, "skipped" if report.skipped else "passed")


def pytest_sessionfinish(session, exitstatus):
    out = os.environ.get("BNJAX_COMPAT_RECORD")
    if out:
        worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
        record = {"constructed": sorted(_constructed), "outcomes": _outcomes}
        (Path(out) / f"record-{worker}.json").write_text(json.dumps(record))
