# The README's two commands: `make test` and `make demo`. Both build .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test demo bench lint clean mutants

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check bnjax tests examples benchmarks
	$(BIN)/ruff format --check bnjax tests examples benchmarks

test: lint
	$(BIN)/python -m pytest -n auto --durations=15

demo: $(STAMP)
	$(BIN)/python examples/seed_walkthrough.py
	$(BIN)/python examples/train_digits.py --config configs/train_digits.toml

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py

# Mutation testing (not part of CI; see tests/MUTANTS.md): first the mutants listed in
# tests/listed_mutants.py, then every comparison, arithmetic, boolean and return-value
# mutant of $(MUTANT_TARGETS), each run against the tests that cover its line, stopping
# at the first failure. About 2 hours on 2 cores; results are cached in
# .gremlins_cache, so a second run only tests the mutants of changed code.
# The slow integration tests (examples, the two-process run, the benchmark harness) are
# left out: each would take most of a mutant's time budget.
MUTANT_TARGETS ?= bnjax/_src
MUTANT_TESTS ?= tests --ignore-glob='tests/test_examples_*' --ignore=tests/test_multihost.py \
	--ignore=tests/test_benchmarks.py
mutants: $(STAMP)
	$(BIN)/python -m pip install --quiet "pytest-gremlins==1.12.2"
	$(BIN)/python tests/listed_mutants.py
	$(BIN)/python -m pytest -o addopts="" -q -n 2 $(MUTANT_TESTS) \
	  --gremlins --gremlin-targets=$(MUTANT_TARGETS) --gremlin-cache --gremlin-workers=2 \
	  --gremlin-mutant-timeout=600 --gremlin-coverage-timeout=7200 \
	  --gremlin-report=console,json,html

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .gremlins_cache coverage build *.egg-info
