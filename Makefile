# The front door of the kit. `make demo` and `make test` do all the set-up on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Jupyter looks in the project's environment before a user's own kernels.
export JUPYTER_PREFER_ENV_PATH := 1

.PHONY: env demo test test-unit test-integration test-notebooks bench report lab lint lock clean

# JupyterLab's settings for this environment (no news prompt): see jupyterlab/overrides.json5.
LAB_OVERRIDES := $(VENV)/share/jupyter/lab/settings/overrides.d/digitserve.json5

env: $(STAMP) $(LAB_OVERRIDES)

# Everything goes into .venv: nothing is installed outside the project, so this works where the
# system pip refuses to install (an "externally managed" Python).
$(STAMP): pyproject.toml requirements.lock
	@$(PYTHON) -m venv $(VENV) || { echo "Could not create $(VENV) with $(PYTHON): install the venv module (Debian/Ubuntu: apt-get install python3-venv) or set PYTHON=/path/to/python3.11"; exit 1; }
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --constraint requirements.lock --editable '.[dev]'
	$(BIN)/python -m ipykernel install --sys-prefix --name digitserve --display-name "Python (digitserve)" >/dev/null
	$(BIN)/digitserve check
	@touch $@

$(LAB_OVERRIDES): jupyterlab/overrides.json5 | $(STAMP)
	@mkdir -p $(@D)
	cp $< $@

demo: env
	$(BIN)/digitserve demo

# Every tier; the three below run one tier each (markers in pyproject.toml).
test: env
	$(BIN)/python -m pytest

# In-process only: no MNIST, no server (under a minute).
test-unit: env
	$(BIN)/python -m pytest -m unit

# Real MNIST and real servers over real gRPC.
test-integration: env
	$(BIN)/python -m pytest -m integration

# Every notebook at its quick setting; one alone with e.g. `make test-notebooks K=04`.
test-notebooks: env
	$(BIN)/python -m pytest -m notebook $(if $(K),-k $(K))

bench: env
	$(BIN)/digitserve bench

report: env
	$(BIN)/digitserve report

# JupyterLab refuses to run as root unless told --allow-root. Containers, cloud VMs and many
# workshop machines log you in as root, so it is allowed there, and only there: as any other
# user the flag is left out. Extra options go in LAB_ARGS, e.g. `make lab LAB_ARGS=--port=9999`.
LAB_ROOT := $(if $(filter 0,$(shell id -u)),--allow-root)

lab: env
	$(BIN)/digitserve data
	$(BIN)/jupyter lab --notebook-dir=notebooks $(LAB_ROOT) $(LAB_ARGS)

lint: env
	$(BIN)/ruff check src tests

# Re-pin every dependency after editing pyproject.toml (run in a fresh environment).
lock:
	rm -rf /tmp/digitserve-lock && $(PYTHON) -m venv /tmp/digitserve-lock
	/tmp/digitserve-lock/bin/python -m pip install --quiet --upgrade pip
	/tmp/digitserve-lock/bin/python -m pip install --quiet --editable '.[dev]'
	/tmp/digitserve-lock/bin/python -m pip freeze --exclude-editable | grep -v '^digitserve' > requirements.lock

clean:
	-$(BIN)/digitserve serve stop
	rm -rf build
