# make install  - a venv in .venv with every pinned dependency (Python 3.11)
# make demo     - every stage end to end on synthetic cells, offline (a few minutes)
# make test     - the whole test suite, as CI runs it
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
# Tools the pipeline starts by name (dvc, uvicorn for `mlflow models serve`) come from the venv.
export PATH := $(abspath $(BIN)):$(PATH)
export MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=1 DVC_NO_ANALYTICS=1 \
       NO_ALBUMENTATIONS_UPDATE=1 RAY_USAGE_STATS_ENABLED=0 HF_HUB_OFFLINE=1

.PHONY: install demo test test-fast sample clean-demo

install:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install -c requirements.lock -e '.[dev,cluster]'

demo:
	$(BIN)/python -m pipeline demo --dir demo

test:
	$(BIN)/python -m pytest

test-fast:
	$(BIN)/python -m pytest -m "not slow"

clean-demo:
	rm -rf demo
