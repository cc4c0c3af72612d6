# `make test` and `make bench` do their own set-up on a fresh machine: a .venv with the CPU build of
# torch (torch==2.13.0; never a CUDA build), Triton (its kernels run interpreted on the CPU in the
# tests), the test tools, and the C++ extension built in place.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEPS := $(VENV)/.deps-installed
TORCH_PIN := torch==2.13.0
TRITON_PIN := triton==3.6.0
TEST_DEPS := numpy pytest hypothesis pytest-benchmark ruff setuptools wheel

.PHONY: all build test lint bench clean

all: test

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(DEPS): $(BIN)/python Makefile
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_PIN) $(TRITON_PIN) $(TEST_DEPS)
	touch $@

# Incremental: setup.py lists the headers as dependencies, so only changed sources recompile.
build: $(DEPS)
	$(BIN)/python setup.py -q build_ext --inplace 2>&1 | grep -v -E "^(running|copying|creating|/.*UserWarning|  warnings.warn|!!|\*\*\*)" || true
	$(BIN)/python -c "import rose_kernels.ops as o; assert o.available(), o.EXTENSION_ERROR; print('rose_kernels extension:', o.cpu_capability())"

lint: $(DEPS)
	$(BIN)/ruff check rose_kernels tests bench setup.py

test: build lint
	$(BIN)/python -m pytest -q tests

bench: build
	$(BIN)/python bench/bench_step.py

clean:
	rm -rf build rose_kernels/*.so *.egg-info .pytest_cache .hypothesis
