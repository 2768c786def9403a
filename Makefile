# The two set-up commands of the README: `make demo` (main job) and `make test` (the test suite).
# Each creates .venv from the project's own files on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3

.PHONY: demo test
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test,notebooks,tpu]"
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/jais2 demo

test: $(VENV)/.installed
	$(PY) -m pytest
