# resnet-serving — the README's two commands are `make serve` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 8080
PYTEST_ARGS ?=
# CIFAR-10 and the paper's reproduction (make cifar / reproduce / bundled-model)
CIFAR_TARBALL ?= ../shared/data/cifar10-jpeg.tar.xz
DATA ?= data
CONCURRENT ?= 3
TIME_LIMIT ?=
ITERATIONS ?= 64000
BUNDLED_RUN ?= runs/bundled-resnet20-$(ITERATIONS)
REPOSITORY ?= model_repository
EXPORT_FLAGS ?=

# make bench: the committed docs/benchmarks.md is ResNet-50's; the bundled ResNet-20's page is
# docs/benchmarks-resnet20.md (make bench BENCH_ARCH=resnet20 BENCH_DOCS=/tmp/bench20, then copy benchmarks.md)
BENCH_ARCH ?= resnet50
BENCH_DOCS ?= docs

.PHONY: setup serve test test-fast bench lint browser triton cifar reproduce bundled-model clean help

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

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

serve: setup  ## serve the bundled model on http://HOST:PORT (default 127.0.0.1:8080; embedded ONNX Runtime)
	$(BIN)/resnet serve --host $(HOST) --port $(PORT)

test: setup browser  ## run the whole test suite (unit + real processes on loopback)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: setup  ## tests not marked slow
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

triton: setup  ## serve model_repository/ with the bundled CPU Triton server
	$(BIN)/resnet triton serve --repository model_repository

bench: setup  ## run the benchmark suite on BENCH_ARCH (resnet50); regenerates BENCH_DOCS (docs)/benchmarks.md + img/
	$(BIN)/resnet bench --arch $(BENCH_ARCH) --docs $(BENCH_DOCS)

cifar: setup  ## extract CIFAR-10 (JPEG) from CIFAR_TARBALL into DATA/ and decode it once into the training cache
	$(BIN)/python -m training.cifar --tarball $(CIFAR_TARBALL) --data-path $(DATA)

reproduce: cifar  ## the paper's 9 CIFAR-10 nets (a GPU job; resumable; TIME_LIMIT=9m for a slice), then table + Fig. 6
	$(BIN)/python -m training.reproduce run --data $(DATA)/cifar10-jpeg --concurrent $(CONCURRENT) \
	  $(if $(TIME_LIMIT),--time-limit $(TIME_LIMIT))

# cifar-paper with the schedule scaled to ITERATIONS (lr /10 at 1/2 and 3/4: the paper's 32k/48k of 64k), resumed
# from BUNDLED_RUN's last checkpoint if there is one; then exported (FP32 + INT8) as a new version of the bundled
# model and every variant evaluated on the full test set, the numbers its model card reports.
bundled-model: cifar  ## train the cifar-paper ResNet-20 (ITERATIONS), export it into REPOSITORY, evaluate it
	OMP_WAIT_POLICY=PASSIVE $(BIN)/resnet train --recipe cifar-paper --arch resnet20 --data $(DATA)/cifar10-jpeg \
	  --iterations $(ITERATIONS) --lr-milestones $$(( $(ITERATIONS) / 2 )),$$(( $(ITERATIONS) * 3 / 4 )) \
	  --eval-every $$(( ($(ITERATIONS) + 15) / 16 )) --checkpoint-every 250 --log-every 100 --channels-last \
	  --no-progress --output-dir $(BUNDLED_RUN) --resume auto
	checkpoint=$$(printf '%s/checkpoint-%07d.pt' $(BUNDLED_RUN) $(ITERATIONS)) && \
	$(BIN)/resnet export --checkpoint $$checkpoint --name resnet20_cifar10 --repository $(REPOSITORY) \
	  --target cpu --int8 --calib-data $(DATA)/cifar10-jpeg/train --calib-images 512 \
	  --eval-data $(DATA)/cifar10-jpeg/test --keep-versions 1 $(EXPORT_FLAGS) && \
	$(BIN)/resnet evaluate --checkpoint $$checkpoint --data $(DATA)/cifar10-jpeg --json && \
	for model in resnet20_cifar10 resnet20_cifar10_int8; do \
	  version=$$(ls $(REPOSITORY)/$$model | grep -E '^[0-9]+$$' | sort -n | tail -1); \
	  $(BIN)/resnet evaluate --checkpoint $$checkpoint --onnx $(REPOSITORY)/$$model/$$version/model.onnx \
	    --data $(DATA)/cifar10-jpeg --json || exit 1; \
	done

lint: setup  ## ruff
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:  ## remove the venv and caches
	rm -rf $(VENV) .pytest_cache .ruff_cache
