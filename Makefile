# make demo: set up, then run the main job on the embedded default.
# make test: set up, then run the test suite.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
UNAME := $(shell uname -s)

.PHONY: setup demo test clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
ifeq ($(UNAME),Linux)
	# The CPU wheel of torch on this disk; installed before anything that depends on torch
	# so that nothing pulls a multi-GB CUDA build.
	$(PIP) install -q torch==2.13.0
endif
	$(PIP) install -q -e ".[test]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) -m apps.demo

test: setup
	$(PY) -m pytest

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
