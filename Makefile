# advdetect: `make demo` and `make test` are the two commands a fresh clone needs.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
BUILD  := build
MODELS := $(BUILD)/models

.PHONY: install demo test bench models clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, pinned exactly, so that nothing later resolves it to a CUDA build.
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[offline,test]"
	touch $(STAMP)

install: $(STAMP)

$(MODELS)/digits_cnn.onnx: $(STAMP)
	$(VENV)/bin/advdetect demo-models --out $(MODELS)

models: $(MODELS)/digits_cnn.onnx

demo: models
	$(VENV)/bin/advdetect layers --model $(MODELS)/digits_cnn.onnx
	@echo "demo: models are in $(MODELS)/. Calibration, serving and traffic arrive with the next issues."

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	@ls bench/*.py >/dev/null 2>&1 && for b in bench/*.py; do $(PY) $$b || exit 1; done || echo "no benchmarks yet"

clean:
	rm -rf $(BUILD) .pytest_cache

# Regenerate the checked-in gRPC stubs in service/_generated/ from protos/ (needs the pinned grpcio-tools).
.PHONY: protos
protos: $(STAMP)
	$(PY) -m service.protogen
