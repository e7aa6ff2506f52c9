# ER-PRM reproducibility kit. `make help` lists the targets.
PYTHON      ?= python3
VENV        ?= .venv
TORCH_SPEC  ?= 2.13.0
PROFILE     ?= tiny
PY          := $(VENV)/bin/python
STAMP       := $(VENV)/.erprm-installed
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: help setup test test-fast smoke reproduce figures bench golden lint lab clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

setup: $(STAMP)  ## create .venv (if missing) and install torch==$(TORCH_SPEC) + this package with dev extras

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check "torch==$(TORCH_SPEC)"
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	@touch $(STAMP)

test: setup  ## run the whole test suite (unit, property, smoke pipeline, nbval)
	$(PY) -m pytest

test-fast: setup  ## unit and property tests only (no `slow` test, no pipeline, no kernel): under a minute
	$(PY) -m pytest -m "not slow and not kernel"

smoke: setup  ## run the smoke profile end to end (about 2 minutes)
	$(VENV)/bin/erprm reproduce --profile smoke

reproduce: setup  ## run the whole study on the tiny profile (CPU, no downloads)
	$(VENV)/bin/erprm reproduce --profile $(PROFILE)

figures: setup  ## redraw figures and the summary table from results/$(PROFILE)/tables
	$(VENV)/bin/erprm figures --profile $(PROFILE)

bench: setup  ## speed benchmarks (ratios against naive baselines)
	$(VENV)/bin/erprm bench

golden: setup  ## rerun the smoke chain and rewrite tests/golden/smoke_tables.sha256 (when a change is meant to change results)
	$(VENV)/bin/erprm golden

lint: setup  ## ruff check
	$(VENV)/bin/ruff check .

lab: setup  ## open JupyterLab on notebooks/ (with the CPU profiles' pinned numerics)
	ATEN_CPU_CAPABILITY=avx2 MKL_CBWR=AVX2,STRICT ONEDNN_MAX_CPU_ISA=AVX2 $(VENV)/bin/jupyter lab --allow-root notebooks/

clean:  ## delete runs/ and caches (never results/)
	rm -rf runs .pytest_cache .ruff_cache .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
