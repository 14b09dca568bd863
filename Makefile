PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Training needs requirements.txt only. The tests also need pytest, ruff (make test checks the code with it first,
# as pyproject.toml says) and the export packages (--export and its tests use them); `make test` and
# `make test-fast` add them, `make train` and `make transfer` do not.
EXPORT_PACKAGES := 'onnx>=1.17' 'onnxscript>=0.2' 'onnxruntime>=1.20'
TEST_PACKAGES := $(VENV)/.test-packages
# make board serves these runs' TensorBoard event files on this machine only: http://127.0.0.1:$(PORT)/
LOGDIR ?= runs
PORT ?= 6006

.PHONY: test test-fast train transfer venv board

$(PY): requirements.txt
	test -x $(PY) || $(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 10) and "error: Python 3.10 or newer is needed, $(PYTHON) is " + sys.version.split()[0] + "; run make PYTHON=python3.X with a newer one")'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	touch $(PY)

$(TEST_PACKAGES): $(PY) Makefile
	$(PY) -m pip install -q pytest ruff $(EXPORT_PACKAGES)
	touch $(TEST_PACKAGES)

venv: $(PY)

test: $(TEST_PACKAGES)
	$(PY) -m ruff check .
	$(PY) -m pytest -q tests

test-fast: $(TEST_PACKAGES)
	$(PY) -m ruff check .
	$(PY) -m pytest -q -m "not slow" tests

train: $(PY)
	$(PY) ex1_convnet.py

board: $(PY)
	$(PY) -m tensorboard.main --logdir $(LOGDIR) --host 127.0.0.1 --port $(PORT)

transfer: $(PY)
	$(PY) ex2_transfer.py --pretrained
	$(PY) ex2_transfer.py --scratch
	$(PY) ex2_transfer.py --compare runs/ex2-pretrained runs/ex2-scratch
