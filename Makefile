# Two entry points that work on a fresh machine:
#   make demo   installs, then quantizes a shipped wav2vec2 reference to real INT8 with StableQuant
#               ranges and reports FP32 vs INT8 WER on the offline test split
#   make test   installs, then runs the test suite, and the INT8 tests once more as oneDNN runs on an
#               x86 CPU without VNNI (ONEDNN_MAX_CPU_ISA=AVX2), whatever CPU this is
# torch is pinned to the local CPU wheel first (2.13.0); pyproject states the supported range.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-avx2 test-fast lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: install
	$(BIN)/python -m sq_plugin.demo

# oneDNN reads ONEDNN_MAX_CPU_ISA once, at process start: the capped run needs its own pytest process.
INT8_TESTS := tests/backends/test_x86_isa.py tests/backends/test_pt2e.py tests/backends/test_artifact.py tests/families/test_whisper_int8.py \
	tests/families/test_ctc.py tests/backends/test_inc.py tests/backends/test_quanto.py tests/backends/test_cuda.py tests/test_cli.py \
	tests/backends/test_plan_backends.py tests/backends/test_observer_state.py tests/families/test_mixed.py \
	tests/backends/test_int8_attention.py tests/backends/test_per_token.py

test: install
	$(BIN)/python -m pytest -q
	ONEDNN_MAX_CPU_ISA=AVX2 $(BIN)/python -m pytest -q $(INT8_TESTS)

test-avx2: install
	ONEDNN_MAX_CPU_ISA=AVX2 $(BIN)/python -m pytest -q $(INT8_TESTS)

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

lint: install
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
