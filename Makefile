# Fresh-machine entry points: each target creates .venv and installs what it needs.
#   make demo     the main job: runtime dependencies only (requirements.txt)
#   make test     the suite: adds the test-only dependencies (torch, diffusers, transformers and the
#                 reference implementations of requirements-test-nodeps.txt, installed without their deps)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_WORKERS ?= 2

.PHONY: test demo install install-runtime clean

$(VENV)/.runtime: requirements.txt setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

$(VENV)/.installed: $(VENV)/.runtime requirements-test.txt requirements-test-nodeps.txt
	$(PY) -m pip install --quiet -r requirements-test.txt
	$(PY) -m pip install --quiet --no-deps -r requirements-test-nodeps.txt
	touch $@

install-runtime: $(VENV)/.runtime

install: $(VENV)/.installed

# --dist worksteal: an idle worker takes tests from the other's queue, so the run does not end on one core
# (fresh-clone suite on 2 cores: 1049.8 s against 1147.0 s with the default load scheduling)
test: $(VENV)/.installed
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist worksteal -q tests

demo: $(VENV)/.runtime
	$(PY) training.py --resume --workdir runs/mnist
	$(VENV)/bin/flaxdiff sample runs/mnist --out runs/mnist/grid.png --overwrite
	@echo "sample grid: runs/mnist/grid.png"

clean:
	rm -rf $(VENV) build *.egg-info
