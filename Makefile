# vlmfit: the front door. `make` (or `make help`) lists every target.
#
# Every target bootstraps its own environment: a .venv from requirements.lock when
# absent (idempotent, quick when present); inside the container the container's
# environment; on a GPU host with a system torch and no internet:
#   make setup PYTHON=/usr/bin/python3 SYSTEM_SITE=1 WHEELS=wheelhouse
# (prepare wheelhouse/ elsewhere with `make wheelhouse PYTHON_VERSION=3.12`).

SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
MAKEFLAGS += --no-print-directory

# ---- the dials (`make help` prints them with their values) ----------------------
# A dial is `NAME ?= default#  meaning` (no space before `#`: make keeps it in the value).
# Empty: the setting is left to vlmfit.config.RunConfig, the one source of defaults
# (`vlmfit train --help` lists them; `vlmfit config --get FIELD` prints one).
MODEL ?=#                       registry name (vlmfit tokens --help lists them; empty: RunConfig's)
WEIGHTS ?=#                     hub | random (published architecture, random weights) | a model folder
REVISION ?=#                    hub revision (branch, tag or commit) for sft/dpo; empty: the registry's (main)
DATA ?=#                        training data, any supported format (file or folder; empty: the bundled one)
SPLIT ?=#                       dataset split of DATA / DPO_DATA when a folder or DatasetDict (all: every one)
FINETUNE ?=#                    lora | qlora (4-bit NF4, CUDA) | full | projector
MAX_IMAGE_TOKENS ?=#            visual-token budget per image (empty or 0: the processor default)
MAX_STEPS ?=#                   optimizer steps (-1: EPOCHS passes over DATA)
EPOCHS ?=#                      passes over DATA when MAX_STEPS is -1
RUN ?=#                         SFT run id, runs/RUN/ (empty: sft-MODEL; DPO's: RUN-dpo or dpo-MODEL)
RESUME ?=#                      1: continue RUN from its last checkpoint
OVERWRITE ?= 0#                 1: replace RUN when it already holds a run (else training refuses)
DPO ?= 0#                       1: `make train` also runs DPO from the SFT adapter
PARAMS ?=#                      other sft/dpo parameters or RunConfig fields: "lora_r=8 learning_rate=1e-4"
NPROC ?= 1#                     processes (GPUs) on this machine; >1: sft/dpo run `vlmfit train` under accelerate launch
DIST ?= ddp#                    with NPROC>1: ddp | fsdp2 | zero3 (accelerate/DIST.yaml; zero3 needs pip install deepspeed)
EVAL_DATA ?=#                   held-out split for exact match (none: no evaluation)
DPO_DATA ?=#                    preference data for `make dpo`
PREF_EVAL_DATA ?=#              held-out preference pairs, reward accuracy (none: none)
REPORTS ?= reports#             where HTML reports go
GPU_GIB ?=#                     GPU memory for `make plan` (empty: this machine's CUDA device)
LAB_IP ?= $(if $(filter 1,$(VLMFIT_IN_CONTAINER)),0.0.0.0,127.0.0.1)#  JupyterLab interface (container: 0.0.0.0, published on the host's loopback)
LAB_PORT ?= 8888#               JupyterLab port
PYTHON ?= python3#              base interpreter for .venv
PYTHON_VERSION ?= 3.12#         for `make wheelhouse`
WHEELS ?=#                      local wheel folder (offline installs)
SYSTEM_SITE ?= 0#               1: .venv sees the system's packages (GPU host torch)
NNODES ?= 1#                    machines; each runs the same make line with its NODE_RANK (docs/distributed.md)
NODE_RANK ?= 0#                 this machine's rank, 0..NNODES-1
MAIN_ADDR ?=#                   address of machine 0, reachable from every machine (NNODES>1)
MAIN_PORT ?= 29500#             a free TCP port on machine 0 (NNODES>1)
DIALS := MODEL WEIGHTS REVISION DATA SPLIT FINETUNE MAX_IMAGE_TOKENS MAX_STEPS EPOCHS RUN RESUME \
         OVERWRITE DPO PARAMS NPROC DIST
MORE_DIALS := EVAL_DATA DPO_DATA PREF_EVAL_DATA REPORTS GPU_GIB LAB_IP LAB_PORT PYTHON \
         PYTHON_VERSION WHEELS SYSTEM_SITE NNODES NODE_RANK MAIN_ADDR MAIN_PORT

# ---- environment -----------------------------------------------------------------
LOCK := requirements.lock
ifeq ($(VLMFIT_IN_CONTAINER),1)
  PY := python3
  ENV_READY :=
else
  PY := .venv/bin/python
  ENV_READY := .venv/.ready
endif
NB := $(PY) -m vlmfit notebook
PIP_SRC := $(if $(WHEELS),--no-index --find-links $(WHEELS),)
# CPU-only hosts (no nvidia-smi): skip the CUDA wheels of the lock; torch then comes
# from a local CPU build when pip has one (find-links), else PyPI's.
TORCH ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo cuda || echo cpu)

# The model named in run and report ids: MODEL, else RunConfig's (asked once, when needed).
MODEL_NAME = $(or $(MODEL),$(eval MODEL_NAME := $(shell $(PY) -m vlmfit config --get model))$(MODEL_NAME))
# DPO trains an adapter (reference = adapter disabled): QLoRA after a QLoRA SFT, else LoRA.
DPO_FINETUNE = $(if $(filter qlora,$(FINETUNE)),qlora,lora)
# Run ids: RUN names the SFT run (DPO's is RUN-dpo); by default sft-MODEL and dpo-MODEL.
SFT_RUN = $(if $(RUN),$(RUN),sft-$(MODEL_NAME))
DPO_RUN = $(if $(RUN),$(RUN)-dpo,dpo-$(MODEL_NAME))
# A setting only when its dial is set (none: explicitly nothing); else RunConfig's default.
p = $(if $(2),-p $(1) $(if $(filter none,$(2)),'',$(2)),)
f = $(if $(2),--$(1) $(2),)
param_args = $(foreach p,$(PARAMS),-p $(firstword $(subst =, ,$(p))) $(patsubst $(firstword $(subst =, ,$(p)))=%,%,$(p)))
# Single-quoted for the shell.
shq = '$(subst ','\'',$(1))'
NB_FLAGS = --reports $(REPORTS) $(if $(filter 1,$(OVERWRITE)),--overwrite,)
BUDGET = $(filter-out 0,$(MAX_IMAGE_TOKENS))
PRE_ARGS = -p model $(MODEL_NAME) $(call p,data,$(DATA)) $(call p,split,$(SPLIT)) \
  $(call p,weights,$(WEIGHTS)) $(call p,max_image_tokens,$(BUDGET))
TRAIN_ARGS = -p model $(MODEL_NAME) $(call p,weights,$(WEIGHTS)) $(call p,dataset_split,$(SPLIT)) \
  $(call p,eval_data,$(EVAL_DATA)) $(call p,max_steps,$(MAX_STEPS)) $(call p,resume,$(RESUME)) \
  $(call p,max_image_tokens,$(BUDGET)) $(call p,revision,$(REVISION))
SFT_ARGS = $(TRAIN_ARGS) -p run $(SFT_RUN) $(call p,data,$(DATA)) $(call p,finetune,$(FINETUNE)) \
  $(call p,num_train_epochs,$(EPOCHS)) $(param_args)
DPO_ARGS = $(TRAIN_ARGS) -p run $(DPO_RUN) $(call p,data,$(DPO_DATA)) \
  $(call p,preference_eval_data,$(PREF_EVAL_DATA)) -p init_adapter $(or $(INIT),$(SFT_RUN)) \
  -p finetune $(DPO_FINETUNE) $(param_args)

# NPROC > 1: the same runs through the CLI (a notebook is one process) on every rank,
# launched by accelerate with accelerate/$(DIST).yaml; the run folder as with one process,
# no notebook report (docs/distributed.md).
LAUNCH = $(PY) -m vlmfit launch --nproc $(NPROC) --dist $(DIST) \
  $(if $(filter-out 1,$(NNODES)),--nnodes $(NNODES) --node-rank $(NODE_RANK) \
  --main-address $(MAIN_ADDR) --main-port $(MAIN_PORT),) $(if $(filter 1,$(OVERWRITE)),--overwrite,) --
param_flags = $(foreach p,$(PARAMS),--$(firstword $(subst =, ,$(p))) $(patsubst $(firstword $(subst =, ,$(p)))=%,%,$(p)))
TRAIN_FLAGS = --model $(MODEL_NAME) $(call f,weights,$(WEIGHTS)) $(call f,dataset-split,$(SPLIT)) \
  $(call f,eval-data,$(EVAL_DATA)) $(call f,max-steps,$(MAX_STEPS)) $(call f,resume,$(RESUME)) \
  $(call f,max-image-tokens,$(BUDGET)) $(call f,revision,$(REVISION))
SFT_FLAGS = --method sft $(TRAIN_FLAGS) --run $(SFT_RUN) $(call f,data,$(DATA)) \
  $(call f,finetune,$(FINETUNE)) $(call f,num-train-epochs,$(EPOCHS)) $(param_flags)
DPO_FLAGS = --method dpo $(TRAIN_FLAGS) --run $(DPO_RUN) $(call f,data,$(DPO_DATA)) \
  $(call f,preference-eval-data,$(PREF_EVAL_DATA)) --init-adapter $(or $(INIT),$(SFT_RUN)) \
  --finetune $(DPO_FINETUNE) $(param_flags)

.PHONY: help setup env lock wheelhouse data demo preprocess profile plan sft dpo train train-check \
        bench lab test test-fast test-slow test-gpu test-browser lint format image \
        container-test clean distclean index merge check-reports

help: ## List every target and dial, with the values this call would use (this page)
	@echo "vlmfit: fine-tune small VLMs within memory.  make TARGET [DIAL=value ...]"
	@echo
	@echo "Dials (current value, meaning):"
	@$(foreach v,$(DIALS),printf '  \033[33m%-17s\033[0m %-28s %s\n' $(v) $(call shq,$(if $($(v)),$($(v)),-)) "$$(sed -n 's/^$(v) ?=[^#]*#[[:space:]]*//p' $(firstword $(MAKEFILE_LIST)))";)
	@echo "  more: $(foreach v,$(MORE_DIALS),$(v)=$(if $($(v)),$($(v)),-))" | fold -s -w 100 | sed '2,$$s/^/        /'
	@echo
	@echo "Targets:"
	@$(foreach v,$(DIALS) $(MORE_DIALS),$(v)=$(call shq,$($(v)))) awk 'BEGIN {FS = ":.*## "} \
	  /^[a-zA-Z_-]+:.*## / { d = $$2; while (match(d, /\$$\([A-Z_]+\)/)) { \
	    n = substr(d, RSTART + 2, RLENGTH - 3); v = ENVIRON[n]; d = substr(d, 1, RSTART - 1) (v == "" ? n : v) substr(d, RSTART + RLENGTH) } \
	    printf "  \033[36m%-15s\033[0m %s\n", $$1, d }' $(MAKEFILE_LIST)

.venv/.ready: $(LOCK) pyproject.toml
	@echo ">> setting up .venv from $(LOCK) (torch: $(TORCH))"
	@test -x .venv/bin/python || $(PYTHON) -m venv $(if $(filter 1,$(SYSTEM_SITE)),--system-site-packages,) .venv
	@.venv/bin/python -m pip install -q --upgrade pip $(PIP_SRC) 2>/dev/null || true
	@if [ "$(SYSTEM_SITE)" = 1 ]; then \
	  .venv/bin/python -m pip install -q $(PIP_SRC) -e '.[dev]'; \
	else \
	  .venv/bin/python scripts/lock_filter.py $(LOCK) --torch $(TORCH) > .venv/requirements.txt; \
	  .venv/bin/python -m pip install -q --no-deps $(PIP_SRC) -r .venv/requirements.txt; \
	  .venv/bin/python -m pip install -q --no-deps --no-build-isolation -e .; \
	fi
	@.venv/bin/nbstripout --install --attributes .gitattributes 2>/dev/null || true
	@touch $@

env: $(ENV_READY)

setup: env ## Create .venv from the lock (idempotent) and install the nbstripout git filter
	@$(PY) -m nbstripout --install --attributes .gitattributes 2>/dev/null || true
	@$(PY) -c "import vlmfit, torch, transformers, trl, peft; print('vlmfit', vlmfit.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__, '| trl', trl.__version__, '| peft', peft.__version__)"

lock: ## Re-compile requirements.lock (exact pins, Python 3.11 + 3.12) and environment.yml
	$(PY) -m pip install -q uv
	$(PY) -m uv pip compile requirements.in --universal --python-version 3.11 -o $(LOCK) --quiet
	$(PY) scripts/lock_filter.py $(LOCK) --environment-yml > environment.yml

wheelhouse: ## Download every locked wheel for PYTHON_VERSION (offline GPU hosts)
	$(PYTHON) -m pip download --no-deps --only-binary=:all: --python-version $(PYTHON_VERSION) \
	  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
	  --platform manylinux2014_x86_64 --platform any -d wheelhouse -r $(LOCK)

data: env ## Generate the bundled shapes dataset into data/shapes (deterministic)
	$(PY) -m vlmfit data --out data/shapes

preprocess: env data ## Validate DATA, put images on $(MODEL)'s visual-token budget, data report
	@$(NB) notebooks/preprocess.ipynb --name preprocess-$(MODEL_NAME) $(NB_FLAGS) $(PRE_ARGS)

profile: env data ## Measure memory and speed of $(MODEL)'s training step (memory ladder report)
	@$(NB) notebooks/profile.ipynb --name profile-$(MODEL_NAME) $(NB_FLAGS) \
	  -p model $(MODEL_NAME) $(call p,weights,$(WEIGHTS)) $(call p,finetune,$(FINETUNE))

plan: env ## Predict peak memory for $(MODEL) and pick a config that fits the GPU
	@$(PY) -m vlmfit plan --model $(MODEL_NAME) $(if $(GPU_GIB),--gpu-gib $(GPU_GIB),)

sft: env data ## Supervised fine-tuning (TRL SFTTrainer) of $(MODEL), $(FINETUNE), on DATA; runs/RUN, report (NPROC>1: accelerate)
ifeq ($(NPROC),1)
	@$(NB) notebooks/sft.ipynb --name $(SFT_RUN) $(NB_FLAGS) $(SFT_ARGS)
else
	@$(LAUNCH) $(SFT_FLAGS)
endif

dpo: env data ## DPO (TRL DPOTrainer) from the SFT run's adapter (INIT=<run>) on DPO_DATA; report (NPROC>1: accelerate)
ifeq ($(NPROC),1)
	@$(NB) notebooks/dpo.ipynb --name $(DPO_RUN) $(NB_FLAGS) $(DPO_ARGS)
else
	@$(LAUNCH) $(DPO_FLAGS)
endif

# Every check of `make train` (model, data, parameter names, run ids) before its first notebook.
train-check: env data
	@$(NB) notebooks/preprocess.ipynb --check $(NB_FLAGS) $(PRE_ARGS)
	@$(NB) notebooks/sft.ipynb --check $(NB_FLAGS) $(SFT_ARGS)
	@if [ "$(DPO)" = 1 ]; then $(NB) notebooks/dpo.ipynb --check $(NB_FLAGS) $(DPO_ARGS); fi

train: train-check ## Preprocess + SFT + evaluation (+ DPO with DPO=1) for $(MODEL); reports
	@$(MAKE) preprocess
	@$(MAKE) sft
	@if [ "$(DPO)" = 1 ]; then $(MAKE) dpo; fi
	@$(PY) -m vlmfit index --reports $(REPORTS)

demo: env ## The whole pipeline offline on CPU: bundled data, tiny model, SFT, DPO, reports (~5 min, 2 cores)
	@$(PY) -m vlmfit demo --reports $(REPORTS)

index: env ## Rebuild reports/index.html linking every report and run
	$(PY) -m vlmfit index --reports $(REPORTS)

merge: env ## Merge RUN's LoRA adapter into its base model (runs/RUN/merged)
	@$(PY) -m vlmfit merge $(SFT_RUN)

BENCH_SUITE ?= all#             benchmarks/fastpath.py suite: smolvlm | qwen7b | qwen7b-qlora | ladder | packing | all

bench: env ## Benchmarks: preprocessing images/s; on CUDA the fast-path table (docs/benchmarks.md) and GPU tests
	$(PY) -m pytest -q -m "bench or gpu" -p no:cacheprovider tests --benchmarks
	@if $(PY) -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then \
	  $(PY) benchmarks/fastpath.py --suite $(BENCH_SUITE) --out $(REPORTS)/bench; \
	else echo "bench: no CUDA device, so no fast-path table (docs/benchmarks.md has the last one)"; fi

lab: env ## JupyterLab on $(LAB_IP):$(LAB_PORT), token required; prints the URL with its token
	@$(PY) -m vlmfit lab --ip $(LAB_IP) --port $(LAB_PORT)

test: env ## The test suite on CPU: fast tests, whole notebooks on tiny models, reports in chromium
	@bash scripts/ensure_browser.sh
	$(PY) -m pytest -q tests

test-fast: env ## Fast tests only (no notebooks, no browser)
	$(PY) -m pytest -q -m "not slow and not browser" tests

test-browser: env ## Reports in headless chromium (installs it with apt when root; skips otherwise)
	@bash scripts/ensure_browser.sh
	$(PY) -m pytest -q -m browser tests

check-reports: env ## Check $(REPORTS) in headless chromium: pages load, images render, links resolve
	$(PY) tests/browser.py $(REPORTS)

test-gpu: env ## GPU-marked tests (skipped with a reason where CUDA is absent)
	$(PY) -m pytest -q -m gpu tests

lint: env ## ruff lint + format check over lib/, tests/, notebooks/, scripts/ and benchmarks/
	$(PY) -m ruff check lib tests notebooks scripts benchmarks
	$(PY) -m ruff format --check lib tests notebooks scripts benchmarks

format: env ## ruff format + autofix
	$(PY) -m ruff format lib tests notebooks scripts benchmarks
	$(PY) -m ruff check --fix lib tests notebooks scripts benchmarks

image: ## Build the container image (docker, or buildah where no Docker engine runs)
	@if command -v docker >/dev/null && docker info >/dev/null 2>&1; then \
	  docker build -t vlmfit . ; \
	else \
	  buildah bud --isolation chroot --network host --layers -t localhost/vlmfit . ; \
	fi

container-test: ## Build the image on a local Debian base (buildah) and run the CPU tests inside
	bash scripts/container_test.sh

clean: ## Remove generated reports, runs, caches (keeps .venv and data sources)
	rm -rf $(REPORTS)/*.html $(REPORTS)/*.ipynb runs/ data/shapes data/cache .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean ## Also remove .venv and build folders
	rm -rf .venv build wheelhouse
