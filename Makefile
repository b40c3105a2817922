# taskserver: the two commands a fresh machine needs.
#   make demo   install everything, start the local stack and run the demo
#   make test   install everything (apt and pip included) and run the whole test suite
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export DO_NOT_TRACK := true
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: demo test venv system-deps tools test-only bench down clean

$(BIN)/taskserver: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, pinned to the CPU wheel; any other spec would pull a CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[all]"
	# unstructured-inference's own dependencies (torchvision, timm) break beside CPU torch.
	$(BIN)/pip install --quiet --no-deps unstructured-inference==1.6.14
	$(BIN)/python -m compileall -q $(VENV)/lib >/dev/null || true
	touch $(BIN)/taskserver

venv: $(BIN)/taskserver

system-deps:
	bash .ci/system-deps.sh

tools: system-deps
	bash .ci/tools.sh

demo: venv
	$(BIN)/taskserver up --demo

down:
	$(BIN)/taskserver down

test: tools venv test-only

test-only:
	# The import contract first (pyproject.toml [tool.importlinter]): which room may import which.
	$(BIN)/lint-imports --no-cache
	bash .ci/pytest.sh

bench: system-deps venv
	$(BIN)/pip install --quiet -e ".[all,bench]"
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) .tools
