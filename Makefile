# `make test` / `make demo` set everything up on a fresh machine: a .venv with the CPU build of torch
# (installed first and pinned: a bare `torch` requirement would pull a multi-GB CUDA build), then this package.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
# the transformers release the project is developed and tested against (its graphs and masks are what the
# compiler pass sees); the package itself accepts any 5.x
TRANSFORMERS ?= transformers==5.23.0
STAMP := $(VENV)/.blindsight-installed

.PHONY: test demo env clean

env: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)" "$(TRANSFORMERS)"
	$(PY) -m pip install -q -e ".[test,plot]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m ruff check blindsight tests bench
	$(PY) -m pytest -q -n auto --dist loadfile

demo: $(STAMP)
	$(VENV)/bin/blindsight demo

clean:
	rm -rf $(VENV)
