# make repro: set up .venv (first time only) and run the DVC pipeline on the embedded default.
# make test:  set up .venv (first time only) and run the whole test suite.
SHELL := /bin/bash
VENV  := .venv
PY    := $(VENV)/bin/python
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: venv repro test test-fast ui bench clean

venv:
	@bash scripts/bootstrap.sh

repro: venv
	dvc repro

test: venv
	$(PY) -m pytest -q tests

test-fast: venv
	$(PY) -m pytest -q tests/unit

ui: venv
	@bash scripts/ui.sh

bench: venv
	@bash benchmarks/run.sh

clean:
	rm -rf data models samples metrics plots mlflow.db mlartifacts .pytest_cache
