# Two commands do all the set-up on a fresh machine:
#   make demo   -> creates .venv, installs the package, runs the demo
#   make test   -> creates .venv, installs the package with test extras, runs lint, types and tests
PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch; a plain `torch` would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
# extra pip arguments for torch, e.g. --index-url https://download.pytorch.org/whl/cpu
PIP_TORCH_ARGS ?=
BIN := $(VENV)/bin

.PHONY: demo test test-full lint docs bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed-demo: $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet $(PIP_TORCH_ARGS) "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[examples]"
	touch $@

$(VENV)/.installed-test: $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet $(PIP_TORCH_ARGS) "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

demo: $(VENV)/.installed-demo
	$(BIN)/python examples/demo.py --out demo_out

lint: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint
	$(BIN)/pytest -q --durations=15

test-full: lint
	$(BIN)/pytest -q -m "slow or not slow"

docs: $(VENV)/.installed-test
	$(BIN)/mkdocs build --strict

bench: $(VENV)/.installed-test
	$(BIN)/python benchmarks/run_all.py --out benchmarks/results

clean:
	rm -rf $(VENV) site demo_out .pytest_cache .mypy_cache .ruff_cache
