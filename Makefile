# resnet-serving — the README's two commands are `make serve` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 8080
PYTEST_ARGS ?=

.PHONY: setup serve test test-fast bench lint browser triton clean help

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# torch/torchvision are pinned to the releases that install from this machine's disk; numpy<2 for Triton's
# Python backend. Re-runs only when pyproject.toml changes.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1 'numpy<2'
	$(BIN)/pip install --quiet -e '.[all]'
	touch $(STAMP)

setup: $(STAMP)  ## create .venv and install everything (idempotent)

browser:  ## install Debian's Chromium + ChromeDriver for the demo-page test (skipped if apt is unavailable)
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
	    || echo "warning: could not install chromium; browser tests will skip"; }

serve: setup  ## serve the bundled model on http://$(HOST):$(PORT) (embedded ONNX Runtime)
	$(BIN)/resnet serve --host $(HOST) --port $(PORT)

test: setup browser  ## run the whole test suite (unit + real processes on loopback)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: setup  ## tests not marked slow
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

triton: setup  ## serve model_repository/ with the bundled CPU Triton server
	$(BIN)/resnet triton serve --repository model_repository

bench: setup  ## run the benchmark suite; regenerates docs/benchmarks.md and docs/img/
	$(BIN)/resnet bench

lint: setup  ## ruff
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:  ## remove the venv and caches
	rm -rf $(VENV) .pytest_cache .ruff_cache
