# domainlm: the pipeline's stages, wired by the files each one writes under build/<run>/.
#   make corpus pretrain finetune      the demo recipe on CPU (creates .venv on first use)
#   make align                         preference tuning of the fine-tuned model (after finetune)
#   make corpus RECIPE=recipes/x.yaml  any stage with another recipe
#   make test                          the whole test suite
#   make check-interop                 the demo's exports in llama.cpp, transformers, peft, openai
# Every stage command is idempotent: it compares its inputs with its manifest and does
# nothing when they match, so the targets can stay phony and `make finetune` re-checks
# every earlier stage in seconds.

RECIPE ?= recipes/demo.yaml
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DLM    := $(BIN)/domainlm

# llama-cpp-python (a dev dependency) compiles llama.cpp from source, 15-30 minutes on two cores;
# a wheel prebuilt for this machine type in ../shared/wheels (next to the checkout) is used
# when that folder exists.
WHEELS := $(wildcard $(CURDIR)/../shared/wheels)
FIND_LINKS := $(if $(WHEELS),--find-links $(abspath $(WHEELS)) --prefer-binary,)

# Constraints reach pip's isolated build environments too (through the environment).
export PIP_CONSTRAINT := $(CURDIR)/constraints.txt
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup corpus tokenizer tokens plan pretrain finetune align quantize eval bench test test-fast \
        lint clean check-interop gpu-check

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt $(FIND_LINKS) -e '.[dev]'
	touch $@

corpus: $(STAMP)
	$(DLM) corpus build --recipe $(RECIPE)

tokenizer: corpus
	$(DLM) tokenizer train --recipe $(RECIPE)

tokens: tokenizer
	$(DLM) tokens --recipe $(RECIPE)

plan: tokens
	$(DLM) plan --recipe $(RECIPE)

pretrain: plan
	$(DLM) pretrain --recipe $(RECIPE)

finetune: pretrain
	$(DLM) finetune --recipe $(RECIPE)

align: finetune
	$(DLM) align --recipe $(RECIPE)

quantize: align
	$(DLM) quantize --recipe $(RECIPE)

eval: quantize
	$(DLM) eval --recipe $(RECIPE)

# The benchmarks' own dependencies (datatrove, the corpus baseline) are the `bench` extra.
bench: $(STAMP)
	$(BIN)/python -c 'import datatrove, spacy, orjson' 2>/dev/null || \
		$(BIN)/pip install --quiet -e '.[bench]'
	$(BIN)/python -m bench

test: $(STAMP)
	$(BIN)/python -m pytest -q

# The suite without the end-to-end tests marked slow (those train and export real models).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

# The run's exported files in the tools they are made for (scripts/check_interop.py): every
# GGUF in llama.cpp with text prompts, every folder in transformers, every adapter in peft, and
# `domainlm serve` through the openai client and lm-eval. Builds the stages it needs first.
check-interop: quantize
	$(BIN)/python -c 'import llama_cpp' 2>/dev/null || \
		$(BIN)/pip install --quiet $(FIND_LINKS) llama-cpp-python
	$(BIN)/python scripts/check_interop.py --recipe $(RECIPE)

# The GPU check (scripts/gpu_check.py): on one H100/H200, short bf16 runs of gpu-125m (eager
# and compiled) and gpu-1b (FSDP, ZeRO-2/3 on several GPUs; activation checkpointing on one),
# in at most 8 minutes, without downloads; writes bench/gpu_check.json, which `make bench`
# renders. Works without the venv (a GPU machine's own Python with torch, lightning, PyYAML and
# sentencepiece). GPU_CHECK_ARGS=--cpu runs the same path with tiny sizes.
GPU_PYTHON ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)
gpu-check:
	$(GPU_PYTHON) scripts/gpu_check.py $(GPU_CHECK_ARGS)

# ruff, and the layers contract of pyproject.toml: no module imports from a layer above it.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports

clean:
	rm -rf build
