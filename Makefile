# `make test` and `make demo` work on a fresh machine: they create .venv, install torch (pinned by
# TORCH_VERSION, override with `make test TORCH_VERSION=...`), the pinned requirements, and this
# package with its C++ extension, then run.
PYTHON        ?= python3
TORCH_VERSION ?= 2.13.0
VENV          ?= .venv
PY            := $(VENV)/bin/python
PYTEST_ARGS   ?=
STAMP         := $(VENV)/.installed-$(TORCH_VERSION)
EXT_SOURCES   := $(wildcard csrc/*.cpp csrc/*.cu csrc/*.h)

.PHONY: venv test demo demo-clean clean ext gpu-wheels

venv: $(STAMP) moc_megatron/.ext-stamp

$(STAMP): requirements.txt setup.py Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -r requirements.txt
	rm -f $(VENV)/.installed-*
	touch $@

# The editable install compiles csrc/ into moc_megatron/_C*.so; redone when a source changes.
moc_megatron/.ext-stamp: $(STAMP) $(EXT_SOURCES)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

ext: moc_megatron/.ext-stamp

test: venv
	$(PY) -m pytest $(PYTEST_ARGS)

demo: venv
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) tools/quickstart.py --out demo_out

# .whl/ for the GPU check machine (Python 3.12 with its own CUDA torch, no package index): the pinned
# requirements but torch and triton, as cp312 wheels (benchmarks/gpu/README.md). GPU_WHEELS_ARGS passes
# options on, e.g. GPU_WHEELS_ARGS="--skip-requirements torch triton" keeps tensorboard and transformers.
GPU_WHEELS_ARGS ?=
gpu-wheels: $(STAMP)
	$(PY) benchmarks/gpu/wheels.py --dest .whl $(GPU_WHEELS_ARGS)

demo-clean:
	rm -rf demo_out

clean: demo-clean
	rm -rf build moc_megatron/_C*.so moc_megatron/.ext-stamp *.egg-info
