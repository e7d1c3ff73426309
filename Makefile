# Two commands set everything up on a fresh machine: `make demo` and `make test`.
# Paths are the checkout's, so `make -f CHECKOUT/Makefile demo` from another folder works too
# (the demo writes ./demo-out in the current folder).
ROOT   := $(patsubst %/,%,$(dir $(abspath $(lastword $(MAKEFILE_LIST)))))
PYTHON ?= python3
VENV   ?= $(ROOT)/.venv
BIN    := $(VENV)/bin
# torch first and pinned: an unpinned or newer torch pulls a multi-GB CUDA build.
TORCH  := torch==2.13.0
EXTRAS ?= builder,litert,broker,dev,convert-litert

.PHONY: venv demo test test-fast bench clean

# Made once; remade only when pyproject.toml or this file changes (a second `make demo` starts at once).
$(BIN)/.installed: $(ROOT)/pyproject.toml $(ROOT)/Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e "$(ROOT)[$(EXTRAS)]" "$(TORCH)"
	touch $@

venv: $(BIN)/.installed

demo: venv
	$(BIN)/python -m builder.demo

test: venv
	cd $(ROOT) && $(BIN)/python -m pytest

test-fast: venv
	cd $(ROOT) && $(BIN)/python -m pytest -m "not slow"

bench: venv
	cd $(ROOT) && $(BIN)/python bench/compress.py
	cd $(ROOT) && $(BIN)/python bench/agent.py

clean:
	cd $(ROOT) && rm -rf $(VENV) build *.egg-info .pytest_cache
