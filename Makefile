# The doors into the project: `make demo`, `make test`, `make bench`, `make lint`.
# Each one creates .venv when it is missing and installs what it needs; a stamp file per
# dependency set makes the second run fast (it reinstalls only when pyproject.toml changes).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check

.PHONY: demo test bench lint fmt clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# $(call install,EXTRAS,STAMP)
define install
	@echo "installing .[$(1)] into $(VENV) (log: $(VENV)/install-$(1).log)"
	@$(PIP) install -e '.[$(1)]' > $(VENV)/install-$(1).log 2>&1 || { tail -n 30 $(VENV)/install-$(1).log; exit 1; }
	@touch $(2)
endef

$(VENV)/.stamp-dev: pyproject.toml | $(PY)
	$(call install,dev,$@)

$(VENV)/.stamp-demo: pyproject.toml | $(PY)
	$(call install,demo,$@)

comma := ,

demo: $(VENV)/.stamp-demo
	$(PY) -m converters.demo --out demo-out

test: $(VENV)/.stamp-dev
	$(PY) -m pytest -q

# TensorFlow (for the side-by-side with its TFLiteConverter) lives in its own venv: the project
# never needs it. If it cannot be installed, the TFLite benchmark runs without that comparison.
TFVENV ?= .venv-tf
$(TFVENV)/.stamp:
	@echo "installing tensorflow-cpu and tf2onnx into $(TFVENV) (log: $(TFVENV).log)"
	@$(PYTHON) -m venv $(TFVENV) && $(TFVENV)/bin/pip --disable-pip-version-check install \
	  'tensorflow-cpu==2.19.1' 'tf2onnx==1.17.0' > $(TFVENV).log 2>&1 && touch $@ \
	  || echo "could not install TensorFlow (see $(TFVENV).log): no TFLiteConverter comparison"

bench: $(VENV)/.stamp-dev
	@$(MAKE) --no-print-directory $(TFVENV)/.stamp || true
	$(PY) -m benchmarks.convert; c=$$?; $(PY) -m benchmarks.agent; a=$$?; \
	$(PY) -m benchmarks.mqtt; m=$$?; $(PY) -m benchmarks.streams; s=$$?; \
	if [ -f $(TFVENV)/.stamp ]; then $(PY) -m benchmarks.tflite --tf-python $(TFVENV)/bin/python; \
	else $(PY) -m benchmarks.tflite; fi; t=$$?; $(PY) -m benchmarks.prune; p=$$?; \
	$(PY) -m benchmarks.telemetry; $(PY) -m benchmarks.capture; k=$$?; $(PY) -m benchmarks.shadow; h=$$?; \
	$(PY) -m benchmarks.fleet; f=$$?; \
	EDGE_TEST_OUTAGE_S=90 $(PY) -m pytest -q -p no:cacheprovider tests/test_stream_drop.py -k watchdog; o=$$?; \
	$(PY) -m benchmarks.plots; \
	echo "benchmarks: convert exit $$c, agent exit $$a, mqtt exit $$m, streams exit $$s, tflite exit $$t, prune exit $$p, capture exit $$k, shadow exit $$h, fleet exit $$f, 90 s camera outage exit $$o (1 = a target missed; see the tables)"

lint: $(VENV)/.stamp-dev
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

fmt: $(VENV)/.stamp-dev
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) $(TFVENV) $(TFVENV).log demo-out .pytest_cache .mypy_cache .ruff_cache *.egg-info
