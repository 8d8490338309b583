# Quickstart targets. A private virtualenv (.venv) keeps setup reproducible; torch is pinned to the
# CPU build first so that no CUDA build of torch is ever pulled on a machine without a GPU.
# `make demo` installs what the demo needs (Kiln's dependencies, oneDNN on x86-64 Linux: the `cpu`
# extra); `make test` / `make install` the whole test extra (onnxruntime, triton, ...).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO := build/demo

$(VENV)/.torch-cpu:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "torch==2.13.0" || $(BIN)/pip install -q "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu
	touch $@

$(VENV)/.demo-deps: $(VENV)/.torch-cpu pyproject.toml
	$(BIN)/pip install -q -e ".[cpu]"
	touch $@

$(VENV)/.test-deps: $(VENV)/.torch-cpu pyproject.toml
	$(BIN)/pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.test-deps

# the bundled sample ResNet-50 (seeded weights) -> ONNX; build; run; logits checked against PyTorch eager in float64
demo: $(VENV)/.demo-deps
	$(BIN)/python examples/demo.py prepare $(DEMO)
	$(BIN)/kiln build $(DEMO)/resnet50.onnx -o $(DEMO)/resnet50.kiln
	$(BIN)/kiln run $(DEMO)/resnet50.kiln --input input=$(DEMO)/images.npy --check logits=$(DEMO)/expected_logits.npy --iterations 10
	$(BIN)/python examples/demo.py report $(DEMO)

test: $(VENV)/.test-deps
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup tests

.PHONY: install demo test
