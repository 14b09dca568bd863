PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Training needs requirements.txt only. The tests also need pytest and the export packages (--export and its
# tests use them); `make test` and `make test-fast` add them, `make train` and `make transfer` do not.
EXPORT_PACKAGES := 'onnx>=1.17' 'onnxscript>=0.2' 'onnxruntime>=1.20'
TEST_PACKAGES := $(VENV)/.test-packages

.PHONY: test test-fast train transfer venv

$(PY): requirements.txt
	test -x $(PY) || $(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 10) and "error: Python 3.10 or newer is needed, $(PYTHON) is " + sys.version.split()[0] + "; run make PYTHON=python3.X with a newer one")'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	touch $(PY)

$(TEST_PACKAGES): $(PY)
	$(PY) -m pip install -q pytest $(EXPORT_PACKAGES)
	touch $(TEST_PACKAGES)

venv: $(PY)

test: $(TEST_PACKAGES)
	$(PY) -m pytest -q tests

test-fast: $(TEST_PACKAGES)
	$(PY) -m pytest -q -m "not slow" tests

train: $(PY)
	$(PY) ex1_convnet.py

transfer: $(PY)
	$(PY) ex2_transfer.py --pretrained
	$(PY) ex2_transfer.py --scratch
	$(PY) ex2_transfer.py --compare runs/ex2-pretrained runs/ex2-scratch
