"""Runs the pytest-mpi suite in tests/in_rank at several communicator sizes.

Plain pytest-mpi would skip those tests (no MPI) and could hang the whole suite on a
deadlock; here each size is one `mpiexec -n P python -m pytest --with-mpi` job in its own
process group under a timeout, so a deadlock is a failed test.
"""

import pytest

from mpirun import mpiexec


@pytest.mark.parametrize("nprocs", [2, 3, 4])
def test_in_rank_suite(nprocs):
    res = mpiexec(nprocs, ["-m", "pytest", "--with-mpi", "-p", "no:cacheprovider",
                           "tests/in_rank"], timeout=120)
    assert res.returncode == 0, res.output[-4000:]
    assert "passed" in res.stdout and "failed" not in res.stdout
