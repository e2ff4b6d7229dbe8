# Two commands on a fresh machine:  make run   (whole pipeline)   make test   (the test suite)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch first, pinned: these builds lie on the project's machines (pip resolves them offline there)
TORCH ?= torch==2.14.1 torchvision==0.29.1
export PATH := $(abspath $(BIN)):$(PATH)
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: run test test-fast install clean stack stack-down stack-status

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

install: $(BIN)/.installed

## run: install, then the whole pipeline on the embedded default (train-flow via dvc repro)
run: $(BIN)/.installed
	$(BIN)/t2i pipeline

## test: install, then every test (end-to-end ones included)
test: $(BIN)/.installed
	$(BIN)/pytest -q

## test-fast: unit tests only
test-fast: $(BIN)/.installed
	$(BIN)/pytest -q -m "not e2e"

## stack: Prefect server + work pool `local` + deployments + worker, and the MLflow UI, on 127.0.0.1
##        (idempotent; ports T2I_PREFECT_PORT=4200, T2I_MLFLOW_PORT=5000; pids, logs and env in .stack/)
stack: $(BIN)/.installed
	$(BIN)/python -m flows.stack up

## stack-down: stop what `make stack` started (nothing else)
stack-down: $(BIN)/.installed
	$(BIN)/python -m flows.stack down

## stack-status: what the stack runs
stack-status: $(BIN)/.installed
	$(BIN)/python -m flows.stack status

clean:
	rm -rf data/shards data/embeddings data/judge data/model data/samples reports mlflow.db mlartifacts
