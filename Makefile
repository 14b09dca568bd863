PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Optional: --export and its tests need these; training does not.
EXPORT_PACKAGES := 'onnx>=1.17' 'onnxscript>=0.2' 'onnxruntime>=1.20'

.PHONY: test test-fast train transfer venv

$(PY): requirements.txt
	test -x $(PY) || $(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 10) and "error: Python 3.10 or newer is needed, $(PYTHON) is " + sys.version.split()[0] + "; run make PYTHON=python3.X with a newer one")'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt pytest $(EXPORT_PACKAGES)
	touch $(PY)

venv: $(PY)

test: $(PY)
	$(PY) -m pytest -q tests

test-fast: $(PY)
	$(PY) -m pytest -q -m "not slow" tests

train: $(PY)
	$(PY) ex1_convnet.py

transfer: $(PY)
	$(PY) ex2_transfer.py --pretrained
	$(PY) ex2_transfer.py --scratch
	$(PY) ex2_transfer.py --compare runs/ex2-pretrained runs/ex2-scratch
