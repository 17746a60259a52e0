# Fresh-machine entry points: each target creates .venv and installs what it needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_WORKERS ?= 2

.PHONY: test demo install clean

$(VENV)/.installed: requirements.txt requirements-test.txt setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-test.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

install: $(VENV)/.installed

test: $(VENV)/.installed
	$(PY) -m pytest -n $(PYTEST_WORKERS) -q tests

demo: $(VENV)/.installed
	$(PY) training.py --resume --workdir runs/mnist
	$(VENV)/bin/flaxdiff sample runs/mnist --out runs/mnist/grid.png --overwrite
	@echo "sample grid: runs/mnist/grid.png"

clean:
	rm -rf $(VENV) build *.egg-info
