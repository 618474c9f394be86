# advdetect: `make demo` and `make test` are the two commands a fresh clone needs.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
BUILD  := build
MODELS := $(BUILD)/models
BASELINE := $(BUILD)/baselines/digits_cnn

.PHONY: install demo serve test bench models baseline clean

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

$(BASELINE)/manifest.json: $(MODELS)/digits_cnn.onnx
	$(VENV)/bin/advdetect calibrate --model $(MODELS)/digits_cnn.onnx --data digits:calib --out $(BASELINE)

baseline: $(BASELINE)/manifest.json

# Serve the digits CNN, then LeNet-5: send clean then adversarial traffic, print what was flagged, stop the server.
demo: baseline
	$(PY) -m service.demo --models $(MODELS) --baselines $(BUILD)/baselines

# Keep the server up (Ctrl-C or SIGTERM drains it).
serve: baseline
	$(VENV)/bin/advdetect serve --model $(MODELS)/digits_cnn.onnx --baseline $(BASELINE)

test: $(STAMP)
	$(PY) -m pytest -q

# Benchmarks write bench/results/*.md (topology speed, detection quality, gRPC load, hostile traffic,
# per-scorer cost, real architectures, adaptive attacks). Together they take well over an hour on 2 cores.
bench: $(STAMP)
	$(PY) bench/topology.py
	$(PY) bench/quality.py
	$(PY) bench/fusion_ablation.py
	$(PY) bench/label_change.py
	$(PY) bench/scorer_cost.py
	$(PY) bench/load.py
	$(PY) bench/hostile.py
	$(PY) bench/scale.py
	$(PY) bench/quality.py --adaptive lenet5

clean:
	rm -rf $(BUILD) .pytest_cache

# Regenerate the checked-in gRPC stubs in service/_generated/ from protos/ (needs the pinned grpcio-tools).
.PHONY: protos
protos: $(STAMP)
	$(PY) -m service.protogen
