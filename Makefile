# Two commands set everything up on a fresh machine: `make demo` and `make test`.
# Paths are the checkout's, so `make -f CHECKOUT/Makefile demo` from another folder works too
# (the demo writes ./demo-out in the current folder).
ROOT   := $(patsubst %/,%,$(dir $(abspath $(lastword $(MAKEFILE_LIST)))))
PYTHON ?= python3
VENV   ?= $(ROOT)/.venv
BIN    := $(VENV)/bin
# torch first and pinned: an unpinned or newer torch pulls a multi-GB CUDA build.
TORCH  := torch==2.13.0
ONNX2TORCH := onnx2torch==1.5.15
EXTRAS ?= builder,litert,broker,dashboard,postgres,dev,convert-litert,bench

.PHONY: venv demo check test test-fast bench dist clean

# Made once; remade only when pyproject.toml or this file changes (a second `make demo` starts at once).
$(BIN)/.installed: $(ROOT)/pyproject.toml $(ROOT)/Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e "$(ROOT)[$(EXTRAS)]" "$(TORCH)"
	# ONNX -> PyTorch for LiteRT builds of ONNX models; --no-deps: it requires torchvision, which does
	# not import beside torch 2.13 (builder/targets/onnx_to_torch.py works without it)
	$(BIN)/pip install --quiet --no-deps $(ONNX2TORCH)
	touch $@

venv: $(BIN)/.installed

# DEMO_ARGS=--no-wait: end after the stages (at a terminal the fleet's dashboard otherwise stays up until Ctrl-C)
DEMO_ARGS ?=
demo: venv
	$(BIN)/python -m builder.demo $(DEMO_ARGS)

# Lint and types (configured in pyproject.toml); CI runs it before the tests.
check: venv
	cd $(ROOT) && $(BIN)/ruff check builder agent tests bench
	cd $(ROOT) && $(BIN)/mypy

test: venv
	cd $(ROOT) && $(BIN)/python -m pytest

test-fast: venv
	cd $(ROOT) && $(BIN)/python -m pytest -m "not slow"

bench: venv
	cd $(ROOT) && $(BIN)/python bench/compress.py
	cd $(ROOT) && $(BIN)/python bench/agent.py

# The wheel a device installs: pip install 'edgefleet-<version>-py3-none-any.whl[agent]' (deploy/README.md).
# --no-build-isolation: built with the venv's setuptools, no download.
dist: venv
	rm -rf build dist/edgefleet-*.whl
	$(BIN)/python -m pip wheel --quiet --no-deps --no-build-isolation -w dist .
	@ls dist/edgefleet-*.whl

clean:
	cd $(ROOT) && rm -rf $(VENV) build *.egg-info .pytest_cache
