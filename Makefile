# make demo: set up, then run the main job on the embedded default.
# make test: set up, then run the test suite.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
UNAME := $(shell uname -s)

.PHONY: setup system-deps demo demo-model test clean

# Debian packages some tests and examples need (Xvfb for the desktop example, the C++ example's
# libraries), one per line in .ci/apt-packages.txt; installed when missing (as root), else named.
APT_PACKAGES := $(shell cat .ci/apt-packages.txt 2>/dev/null)
system-deps:
ifeq ($(UNAME),Linux)
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ] && command -v apt-get >/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian packages:" $$missing; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  else echo "missing Debian packages:" $$missing "(sudo apt-get install" $$missing")"; exit 1; fi; \
	fi
endif

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

setup: system-deps $(VENV)/.installed

demo: setup
	$(PY) -m apps.demo

# Rebuild the built-in demo model from scratch (tokenizer, VQ-VAE, pretraining, convert,
# fine-tune, export, quantize): apps/demo_model/README.md. Not part of `make test`.
demo-model: setup
	$(PY) -m apps.demo_model.build

test: setup
	$(PY) -m pytest

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
