# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch first and pinned: an unpinned or newer torch pulls a multi-GB CUDA build.
TORCH  := torch==2.13.0
ONNX2TORCH := onnx2torch==1.5.15
EXTRAS ?= builder,litert,broker,dev,convert-litert

.PHONY: venv demo test test-fast bench dist clean

$(BIN)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e ".[$(EXTRAS)]" "$(TORCH)"
	# ONNX -> PyTorch for LiteRT builds of ONNX models; --no-deps: it requires torchvision, which does
	# not import beside torch 2.13 (builder/targets/onnx_to_torch.py works without it)
	$(BIN)/pip install --quiet --no-deps $(ONNX2TORCH)
	touch $@

venv: $(BIN)/.installed

demo: venv
	$(BIN)/python -m builder.demo

test: venv
	$(BIN)/python -m pytest

test-fast: venv
	$(BIN)/python -m pytest -m "not slow"

bench: venv
	$(BIN)/python bench/compress.py
	$(BIN)/python bench/agent.py

# The wheel a device installs: pip install 'edgefleet-<version>-py3-none-any.whl[agent]' (deploy/README.md).
# --no-build-isolation: built with the venv's setuptools, no download.
dist: venv
	rm -rf build dist/edgefleet-*.whl
	$(BIN)/python -m pip wheel --quiet --no-deps --no-build-isolation -w dist .
	@ls dist/edgefleet-*.whl

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
