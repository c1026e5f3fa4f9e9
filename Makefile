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

.PHONY: venv test demo demo-clean clean ext

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

demo-clean:
	rm -rf demo_out

clean: demo-clean
	rm -rf build moc_megatron/_C*.so moc_megatron/.ext-stamp *.egg-info
