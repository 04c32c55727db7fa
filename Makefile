# Two commands for a new user:  `make run` (install + train the digits job on 2 ranks)
# and `make test` (install + the test suite; `make test-slow` adds containers, Slurm, the
# wheel and the fault campaign, `make test-all` runs both).  Everything lives in .venv; MPI comes
# from PyPI (the mpich wheel), so no system MPI is needed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
NP ?= 2
JOB ?= jobs/digits.toml

.PHONY: install run test test-slow test-all clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

run: install
	$(BIN)/mpitrain run -n $(NP) $(JOB) --overwrite

test: install
	$(BIN)/python -m pytest -ra -m "not slow"

test-slow: install
	$(BIN)/python -m pytest -ra -m slow

test-all: install
	$(BIN)/python -m pytest -ra

clean:
	rm -rf $(VENV) runs *.egg-info
