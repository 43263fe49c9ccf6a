# Two commands, from a clean clone on a fresh machine:
#   make demo   set up .venv (CPU torch pinned by constraints.txt) and run `lowbit demo`
#   make test   set up .venv and run the test suite (what CI runs)
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lowbit-installed

.PHONY: venv demo test lint bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	# torch first and pinned: an unpinned torch would pull gigabytes of CUDA packages.
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt torch==2.13.0
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[test,hf,onnx,interop,domains]"
	# MTCNN's pretrained weights ship in facenet-pytorch; --no-deps: its pins (torch<2.3, torchvision)
	# would replace our torch. lowbit reads only its weight files and never imports the package.
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps facenet-pytorch==2.6.0
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/lowbit demo

test: $(STAMP)
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench

bench: $(STAMP)
	$(VENV)/bin/lowbit bench minilm

clean:
	rm -rf $(VENV) lowbit-report
