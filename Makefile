# Targets: `make help` lists them with one line each (the `##` comments below).
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
# Tools the pipeline starts by name (dvc, uvicorn for `mlflow models serve`) come from the venv.
export PATH := $(abspath $(BIN)):$(PATH)
export MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=1 DVC_NO_ANALYTICS=1 \
       NO_ALBUMENTATIONS_UPDATE=1 RAY_USAGE_STATS_ENABLED=0 HF_HUB_OFFLINE=1

.PHONY: help install demo metrics bench bench-gpu test test-fast clean-demo

help: ## this list
	@awk 'BEGIN {FS = ":.*## "} /^[a-z-]+:.*## / {printf "  make %-11s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

# Where torch and torchvision come from: empty = PyPI with the rest (the CUDA build, with its CUDA
# libraries); https://download.pytorch.org/whl/cpu = PyTorch's CPU wheels (as docker/Dockerfile).
TORCH_INDEX_URL ?=
TORCH_PINS = $(shell grep -E '^torch(vision)?==' requirements.lock)

install: ## a venv in .venv with every pinned dependency (Python 3.11), offline plots template
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
ifneq ($(strip $(TORCH_INDEX_URL)),)
	$(BIN)/python -m pip install --index-url $(TORCH_INDEX_URL) $(TORCH_PINS)
endif
	$(BIN)/python -m pip install -c requirements.lock -e '.[dev,cluster]'
	$(BIN)/python -m pipeline plots-template

demo: ## every stage end to end on synthetic cells, offline, in demo/
	$(BIN)/python -m pipeline demo --dir demo

metrics: ## headline test figures and experiments of this project, in 120 columns
	$(BIN)/python -m pipeline metrics

bench: ## after the README's sample run: every throughput comparison -> reports/performance.md (~20 min; OUT=docs publishes)
	$(BIN)/python -m pipeline benchmark --out $(or $(OUT),reports)

ARCHIVE ?= data/raw/malaria.zip
bench-gpu: ## on a CUDA machine: the real stages, then GPU training and scoring against their ceilings -> reports/ (OUT=docs publishes)
	$(BIN)/python -m pipeline.bench.gpu --archive $(ARCHIVE) --out $(or $(OUT),reports)

TEST_WORKERS ?= 2
test: ## the whole test suite, as CI runs it: two pytest processes (CI's two cores; TEST_WORKERS=N)
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadscope

test-fast: ## the tests not marked slow (a few minutes)
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadscope -m "not slow"

clean-demo: ## remove the demo project
	rm -rf demo
