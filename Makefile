# The README's commands: `make test` (before every commit), `make test-all` and `make demo`.
# Each builds .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_STAMP := $(VENV)/.installed-demo

.PHONY: test test-all test-slow demo bench lint clean mutants compat docs

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

# The demo needs only what its two scripts import (bnjax[demo]), not the dev tools.
$(DEMO_STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[demo]"
	touch $(DEMO_STAMP)

lint: $(STAMP)
	$(BIN)/ruff check bnjax tests examples benchmarks compat scripts
	$(BIN)/ruff format --check bnjax tests examples benchmarks compat scripts

# Two tiers, by the `slow` marker (pyproject.toml): make test runs the fast one; make
# test-all runs both (the slow one: example training runs, long hypothesis properties,
# sweeps, the eager twin of each jit test, benchmark smoke, wheel and multi-process tests).
# make test-slow runs the slow tier alone: test + test-slow = test-all (CI runs those two).
PYTEST := $(BIN)/python -m pytest -n auto --durations=15

test: lint
	$(PYTEST) -m "not slow"

test-all: lint
	$(PYTEST) -m ""

test-slow: $(STAMP)
	$(PYTEST) -m slow

demo: $(DEMO_STAMP)
	$(BIN)/python examples/seed_walkthrough.py
	$(BIN)/python examples/train_digits.py --config configs/train_digits.toml

# The docs site (mkdocs, warnings are errors) into site/, then its checks: every internal
# link resolves, and with Chromium installed, pages and formulas render (scripts/build_docs.py).
docs: $(STAMP)
	$(BIN)/python scripts/build_docs.py

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py

# Flax's own tests with bnjax's BatchNorm swapped in (compat/flax_suite.py): about two
# minutes; the Flax source distribution is downloaded once into compat/.cache.
compat: $(STAMP)
	$(BIN)/python compat/flax_suite.py

# Mutation testing (not part of CI; see tests/MUTANTS.md): first the mutants listed in
# tests/listed_mutants.py, then, module by module, every comparison, arithmetic, boolean
# and return-value mutant of bnjax/_src against the module's own tests (tests/mutants.py;
# MUTANT_MODULES="moments ghost" for a few). Results are cached in .gremlins_cache.
MUTANT_MODULES ?=
mutants: $(STAMP)
	$(BIN)/python -m pip install --quiet "pytest-gremlins==1.12.2"
	$(BIN)/python tests/listed_mutants.py
	$(BIN)/python tests/mutants.py $(MUTANT_MODULES)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .gremlins_cache coverage compat/.cache build *.egg-info site docs/javascripts/mathjax
