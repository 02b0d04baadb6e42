# The two quick-start commands: `make train` (set up, then the default run) and
# `make test` (set up, then the test suite). Setup makes .venv once.
PYTHON ?= python3
# torch==2.13.0 from PyPI is a CUDA build on Linux; on a CPU-only machine use its CPU wheel.
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup train test
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

train: setup
	$(BIN)/python train.py

test: setup
	$(BIN)/python -m pytest -q -n 3 --dist loadgroup
