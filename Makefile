# make demo: install the runtime alone (pip install -e .), then run the main job on the embedded
#            default model. No test extras, no Debian packages.
# make test: install everything (the test extras: torch, transformers, mlx-vlm, ...; the Debian
#            packages of .ci/apt-packages.txt), then run the test suite.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
UNAME := $(shell uname -s)

.PHONY: setup runtime system-deps demo demo-model qmv test clean

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

# The runtime: pg_edge and its dependencies (mlx, mlx-lm, numpy, pillow, sentencepiece, ...).
$(VENV)/.runtime: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e .
	touch $@

# Everything the tests need besides: the runtime plus the test extras.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
ifeq ($(UNAME),Linux)
	# The CPU wheel of torch on this disk; installed before anything that depends on torch
	# so that nothing pulls a multi-GB CUDA build.
	$(PIP) install -q torch==2.13.0
endif
	$(PIP) install -q -e ".[test]"
	touch $@ $(VENV)/.runtime

runtime: $(VENV)/.runtime
setup: system-deps $(VENV)/.installed

demo: runtime
	$(PY) -m apps.demo

# Rebuild the built-in demo model from scratch (tokenizer, VQ-VAE, pretraining, convert,
# fine-tune, export, quantize): apps/demo_model/README.md. Needs the test extras (torch), not
# the Debian packages. Not part of `make test`.
demo-model: $(VENV)/.installed
	$(PY) -m apps.demo_model.build

# The optional compiled quantized matvec for MLX's CPU backend (pg_edge/cpu/qmv): needs a C++
# compiler and CMake; built into ~/.cache/pg_edge/qmv, loaded by pg_edge when there.
qmv: runtime
	$(PIP) install -q nanobind==3.1.0
	$(PY) -m pg_edge.cpu.qmv build

test: setup
	$(PY) -m pytest

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
