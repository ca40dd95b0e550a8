# metricops: `make test` and `make bench` set everything up on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.deps-stamp
export MAX_JOBS ?= 2

.PHONY: all venv build test bench bench-quick demo demo-ddp info sanitize clean

all: test

venv: $(STAMP)

$(STAMP): requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-dev.txt
	touch $(STAMP)

# Incremental (ninja): only changed sources recompile.
build: venv
	$(PY) setup.py -q build_ext --inplace

info: build
	$(PY) -m metricops.info

test: build
	$(PY) -m metricops.info
	$(PY) -m pytest tests

bench: build
	$(PY) -m benchmarks

bench-quick: build
	$(PY) -m benchmarks --quick

# End-to-end run: train on sklearn digits 0-4, zero-shot retrieval on 5-9, PNG in demo_out/.
demo: build
	$(PY) -m metricops.demo

# 2 CPU processes (gloo) of DDP training with DistributedLoss; needs scikit-learn.
demo-ddp: build
	$(PY) -m metricops.demo_ddp

clean:
	rm -rf build metricops/*.so
