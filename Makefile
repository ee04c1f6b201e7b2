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

# ---- the dials -----------------------------------------------------------------
MODEL ?= smolvlm#               registry name (python -m vlmfit tokens --help lists them)
WEIGHTS ?= hub#                 hub | random (published architecture, random weights) | folder
DATA ?= data/shapes/sft_train.json#  any supported format; default: the bundled dataset
EVAL_DATA ?= data/shapes/sft_test.json
DPO_DATA ?= data/shapes/dpo_train.json
PREF_EVAL_DATA ?= data/shapes/dpo_test.json
RUN ?=#                         SFT run id (default: sft-<model>; DPO's: <RUN>-dpo or dpo-<model>)
FINETUNE ?= lora#               lora | qlora | full | projector
MAX_IMAGE_TOKENS ?= 0#       visual-token budget per image (none: processor default)
MAX_STEPS ?= -1
EPOCHS ?= 1
RESUME ?= 0#                    1: continue RUN from its last checkpoint
DPO ?= 0#                       1: `make train` also runs DPO after SFT
PARAMS ?=#                      extra sft/dpo notebook parameters: "name=value name=value"
REPORTS ?= reports
PYTHON ?= python3#              base interpreter for .venv
PYTHON_VERSION ?= 3.12#         for `make wheelhouse`
WHEELS ?=#                      local wheel folder (offline installs)
SYSTEM_SITE ?= 0#               1: .venv sees the system's packages (GPU host torch)
GPU_GIB ?=#                     GPU memory for `make plan` (default: this machine's CUDA device)
LAB_IP ?= 127.0.0.1
LAB_PORT ?= 8888

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

# DPO trains an adapter (reference = adapter disabled): QLoRA after a QLoRA SFT, else LoRA.
DPO_FINETUNE = $(if $(filter qlora,$(FINETUNE)),qlora,lora)
# Run ids: RUN names the SFT run (DPO's is RUN-dpo); by default sft-MODEL and dpo-MODEL.
SFT_RUN = $(if $(RUN),$(RUN),sft-$(MODEL))
DPO_RUN = $(if $(RUN),$(RUN)-dpo,dpo-$(MODEL))
param_args = $(foreach p,$(PARAMS),-p $(firstword $(subst =, ,$(p))) $(patsubst $(firstword $(subst =, ,$(p)))=%,%,$(p)))

.PHONY: help setup env lock wheelhouse data demo preprocess profile plan sft dpo train \
        bench lab test test-fast test-slow test-gpu test-browser lint format image \
        container-test clean distclean index merge check-reports

help: ## List every target (this page)
	@echo "vlmfit: fine-tune small VLMs within memory. Variables: MODEL=$(MODEL) WEIGHTS=$(WEIGHTS) DATA=$(DATA) RUN=$(RUN)"
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  \033[36m%-15s\033[0m %s\n", $$1, $$2}'

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

preprocess: env data ## Validate DATA, put images on MODEL's visual-token budget, data report
	$(NB) notebooks/preprocess.ipynb --name preprocess-$(MODEL) --reports $(REPORTS) \
	  -p data $(DATA) -p model $(MODEL) -p weights $(WEIGHTS) -p max_image_tokens $(MAX_IMAGE_TOKENS)

profile: env data ## Measure memory and speed of MODEL's training step (memory ladder report)
	$(NB) notebooks/profile.ipynb --name profile-$(MODEL) --reports $(REPORTS) \
	  -p model $(MODEL) -p weights $(WEIGHTS) -p finetune $(FINETUNE)

plan: env ## Predict peak memory for MODEL and pick a config that fits the GPU
	$(PY) -m vlmfit plan --model $(MODEL) $(if $(GPU_GIB),--gpu-gib $(GPU_GIB),)

sft: env data ## Supervised fine-tuning (TRL SFTTrainer) of MODEL on DATA; report
	$(NB) notebooks/sft.ipynb --name $(SFT_RUN) --reports $(REPORTS) \
	  -p model $(MODEL) -p weights $(WEIGHTS) -p data $(DATA) -p eval_data $(EVAL_DATA) \
	  -p run $(SFT_RUN) -p finetune $(FINETUNE) -p max_steps $(MAX_STEPS) \
	  -p num_train_epochs $(EPOCHS) -p resume $(RESUME) -p max_image_tokens $(MAX_IMAGE_TOKENS) $(param_args)

dpo: env data ## DPO (TRL DPOTrainer) from the SFT run's adapter (INIT=<run>) on DPO_DATA; report
	$(NB) notebooks/dpo.ipynb --name $(DPO_RUN) --reports $(REPORTS) \
	  -p model $(MODEL) -p weights $(WEIGHTS) -p data $(DPO_DATA) -p eval_data $(EVAL_DATA) -p preference_eval_data $(PREF_EVAL_DATA) \
	  -p run $(DPO_RUN) -p init_adapter $(if $(INIT),$(INIT),$(SFT_RUN)) -p finetune $(DPO_FINETUNE) \
	  -p max_steps $(MAX_STEPS) -p resume $(RESUME) $(param_args)

train: preprocess sft ## Preprocess + SFT + evaluation (+ DPO with DPO=1) for MODEL; reports
	@if [ "$(DPO)" = 1 ]; then $(MAKE) dpo; fi
	@$(PY) -m vlmfit index --reports $(REPORTS)

demo: env ## The whole pipeline offline on CPU: bundled data, tiny model, SFT, DPO, reports (<10 min)
	@$(PY) scripts/demo.py --reports $(REPORTS)

index: env ## Rebuild reports/index.html linking every report and run
	$(PY) -m vlmfit index --reports $(REPORTS)

merge: env ## Merge RUN's LoRA adapter into its base model (runs/RUN/merged)
	$(PY) -m vlmfit train --merge $(RUN)

bench: env ## Benchmarks: preprocessing images/s (CPU) and, on CUDA, memory/speed targets
	$(PY) -m pytest -q -m "bench or gpu" -p no:cacheprovider tests --benchmarks

lab: env ## JupyterLab on $(LAB_IP):$(LAB_PORT) with token authentication
	$(PY) -m jupyter lab --ip=$(LAB_IP) --port=$(LAB_PORT) --no-browser \
	  --IdentityProvider.token=$${JUPYTER_TOKEN:-$$($(PY) -c 'import secrets; print(secrets.token_hex(24))')} \
	  --ServerApp.allow_remote_access=$(if $(filter 127.0.0.1 localhost,$(LAB_IP)),False,True)

test: env ## The test suite on CPU: fast tests, whole notebooks on tiny models, reports in chromium
	@bash scripts/ensure_browser.sh
	$(PY) -m pytest -q tests

test-fast: env ## Fast tests only (no notebooks, no browser)
	$(PY) -m pytest -q -m "not slow and not browser" tests

test-browser: env ## Reports in headless chromium (installs it with apt when root; skips otherwise)
	@bash scripts/ensure_browser.sh
	$(PY) -m pytest -q -m browser tests

check-reports: env ## Check $(REPORTS) in headless chromium: pages load, images render, links resolve
	$(PY) -m vlmfit.browser $(REPORTS)

test-gpu: env ## GPU-marked tests (skipped with a reason where CUDA is absent)
	$(PY) -m pytest -q -m gpu tests

lint: env ## ruff lint + format check over lib/, tests/, notebooks/ and scripts/
	$(PY) -m ruff check lib tests notebooks scripts
	$(PY) -m ruff format --check lib tests notebooks scripts

format: env ## ruff format + autofix
	$(PY) -m ruff format lib tests notebooks scripts
	$(PY) -m ruff check --fix lib tests notebooks scripts

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
