# One entry point for people and CI. `make demo` and `make test` are the README's quick start.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The venv's console scripts (iagn, dvc, iagn-pipeline) first on PATH for every recipe.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export DVC_NO_ANALYTICS := 1
export GX_ANALYTICS_ENABLED := false
export MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR := false

.PHONY: help setup data demo test lint format bench image clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

setup: $(STAMP)  ## create .venv and install the project with its dev tools (fast when done)

# Reinstall only when the dependency list changes.
$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "$(PYTHON) not found: install Python 3.11 or run make PYTHON=/path/to/python3.11"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=25"
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $@

data: setup  ## fetch the default dataset with DVC, or regenerate it (deterministic) and track it
	@if [ ! -f data/synth/images.txt ]; then \
	  $(BIN)/dvc pull --quiet data.dvc 2>/dev/null \
	  || $(BIN)/iagn data synth --params params.yaml --out data/synth; \
	fi
	@$(BIN)/dvc add --quiet data
	@$(BIN)/dvc push --quiet data.dvc
	@$(BIN)/dvc status data.dvc

demo: data  ## the main job end to end on the embedded defaults
	$(BIN)/iagn data manifest --root data/synth --out build/manifest.csv
	$(BIN)/iagn validate --data data/synth --params params.yaml --out build/validate
	@echo "data validation: build/validate/summary.md; HTML Data Docs: build/validate/data_docs/index.html"
	@echo "dataset: data/synth (tracked by data.dvc, pushed to the local DVC remote .dvcstore/)"

test: setup  ## run the test suite
	$(BIN)/python -m pytest

lint: setup  ## ruff lint and format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup  ## apply ruff's formatting and safe fixes
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

BENCHES := bench.validate_throughput bench.train_throughput bench.quality

bench: setup  ## run the benchmarks; results land in bench/results/
	@for bench in $(BENCHES); do echo "== $$bench"; $(BIN)/python -m $$bench || exit 1; done

image:  ## build the component image with docker, podman or buildah (whichever exists)
	@bash scripts/build_image.sh

clean:  ## remove build outputs (keeps .venv and data/)
	rm -rf build .pytest_cache .ruff_cache
