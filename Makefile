# make demo: install the runtime alone (pip install -e .), then run the main job on the embedded
#            default model. No test extras, no Debian packages (it names the optional fast BLAS,
#            libopenblas0-pthread, when missing: `make fast-blas` installs it).
# make test: install everything (the test extras: torch, transformers, mlx-vlm, ...; the Debian
#            packages of .ci/apt-packages.txt), then run the test suite.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
UNAME := $(shell uname -s)

.PHONY: setup runtime system-deps fast-blas blas-hint demo demo-model qmv test clean

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

# The fast BLAS under MLX's CPU float32 products (pg_edge/blas.py loads it when present):
# `make fast-blas` installs it when missing and run as root on Debian/Ubuntu, otherwise names it,
# never a failure (pg_edge runs without it, on MLX's bundled reference BLAS, slower). `make setup`
# (what `make test` runs) installs it through .ci/apt-packages.txt.
BLAS_PACKAGE := libopenblas0-pthread
fast-blas:
ifeq ($(UNAME),Linux)
	@if command -v dpkg >/dev/null && ! dpkg -s $(BLAS_PACKAGE) >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing $(BLAS_PACKAGE) (fast float32 products for MLX's CPU backend)"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(BLAS_PACKAGE) >/dev/null) \
	      || echo "could not install $(BLAS_PACKAGE): pg_edge runs on MLX's bundled BLAS (slower)"; \
	  else echo "optional: sudo apt-get install $(BLAS_PACKAGE) (faster CPU prefill; pg_edge runs without it)"; fi; \
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

# What `make demo` says about the fast BLAS: a hint when it is missing, never an install.
blas-hint:
ifeq ($(UNAME),Linux)
	@ls /usr/lib/*/openblas-pthread/libopenblas.so.0 >/dev/null 2>&1 || \
	  echo "optional: $(BLAS_PACKAGE), a fast BLAS for CPU prefill (make fast-blas installs it); pg_edge runs without it"
endif

demo: runtime blas-hint
	$(PY) -m apps.demo

# Rebuild the built-in demo model from scratch (tokenizer, VQ-VAE, pretraining, convert,
# fine-tune, export, quantize): apps/demo_model/README.md. Needs the test extras (torch), not
# the Debian packages. Not part of `make test`.
demo-model: $(VENV)/.installed
	$(PY) -m apps.demo_model.build

# The optional compiled decode matvecs (quantized, bf16/fp16) for MLX's CPU backend (pg_edge/cpu/qmv): needs a C++
# compiler and CMake; built into ~/.cache/pg_edge/qmv, loaded by pg_edge when there.
qmv: runtime
	$(PIP) install -q nanobind==3.1.0
	$(PY) -m pg_edge.cpu.qmv build

test: setup
	$(PY) -m pytest

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
