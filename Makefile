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
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := true

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
	@$(BIN)/iagn remote push --quiet data.dvc
	@$(BIN)/dvc status data.dvc

# The whole KFP DAG on this machine (kfp.local): fetch (dvc pull), validate, train stages
# 1-3, distill, evaluate, gate, register `champion` in the embedded MLflow store ./mlflow.db
# (or $MLFLOW_TRACKING_URI). run-local prints a line per task start and end, writes
# kfp.local's full output to a log file, and prints where to look at the end;
# `make demo VERBOSE=1` shows the full output live.
demo: data  ## the main job end to end: the KFP pipeline run locally, a registered champion
	@$(BIN)/iagn data manifest --root data/synth --out build/manifest.csv
	@echo "dataset: data/synth (tracked by data.dvc, pushed to the local DVC remote .dvcstore/)"
	@$(BIN)/iagn-pipeline run-local $(if $(VERBOSE),--verbose)

test: setup  ## install what the tests need (Chromium, git), then run the test suite
	@bash scripts/test_deps.sh
	$(BIN)/python -m pytest

lint: setup  ## ruff lint and format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup  ## apply ruff's formatting and safe fixes
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

BENCHES := bench.validate_throughput bench.step_throughput bench.quality bench.student_speed \
	bench.kfp_overhead bench.serving_load bench.time_to_accuracy

bench: setup  ## run the benchmarks; results land in bench/results/
	@for bench in $(BENCHES); do echo "== $$bench"; $(BIN)/python -m $$bench || exit 1; done

# The tag the pipeline compiles with by default ($IAGN_IMAGE, see components/image.py).
IMAGE ?= $(or $(IAGN_IMAGE),ghcr.io/iagn/iagn:0.1.0)

# scripts/build_image.sh: docker, podman or buildah, whichever works; BASE_IMAGE=... and
# TORCH_INDEX=... are build arguments. Where the default base cannot be pulled it builds an
# equivalent from Debian packages first (scripts/base_image.sh); no engine at all:
# `sudo bash scripts/container_engine.sh setup` (podman). A failed build keeps the old tag.
image:  ## build the component image (IMAGE=..., BASE_IMAGE=..., TORCH_INDEX=..., PUSH=1 to push it)
	@IMAGE="$(IMAGE)" bash scripts/build_image.sh
	@if [ -n "$(PUSH)" ]; then \
	  if command -v docker >/dev/null && docker info >/dev/null 2>&1; then docker push "$(IMAGE)"; \
	  elif command -v podman >/dev/null; then podman push "$(IMAGE)"; \
	  elif command -v buildah >/dev/null; then buildah push --storage-driver vfs "$(IMAGE)"; \
	  fi; \
	fi
	@echo "compile the pipeline for it: IAGN_IMAGE=$(IMAGE) $(BIN)/iagn-pipeline compile"
	@echo "run the DAG in it here:      $(BIN)/iagn-pipeline run-local --runner docker --image $(IMAGE)"

clean:  ## remove build outputs (keeps .venv and data/)
	rm -rf build .pytest_cache .ruff_cache
