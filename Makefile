# Two entry points that work on a fresh machine:
#   make demo   installs, then quantizes a shipped wav2vec2 reference to real INT8 with StableQuant
#               ranges and reports FP32 vs INT8 WER on the offline test split
#   make test   installs, then runs the test suite
# torch is pinned to the local CPU wheel first (2.13.0); pyproject states the supported range.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: install
	$(BIN)/python -m sq_plugin.demo

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

lint: install
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
