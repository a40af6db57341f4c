# Two entry points for a fresh machine (see README.md):
#   make example   set up, train the example CNN, build it for `cpu` and `onnx`
#   make test      set up, run the test suite
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
TORCH   ?= torch==2.13.0
EXTRAS  ?= onnx,openvino,tflite,dev
FASHION := /usr/share/datasets/fashion-mnist
SUDO    := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup example test fashion-data clean

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[$(EXTRAS)]"
	touch $@

setup: $(BIN)/.installed

fashion-data:
	@[ -d $(FASHION) ] || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist; }

example: setup fashion-data
	cd examples/fashion_mnist && ../../$(BIN)/python train.py && \
	  ../../$(BIN)/edgepack build --target cpu --target onnx --out dist

test: setup
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) examples/*/dist examples/*/data examples/*/weights.pt
