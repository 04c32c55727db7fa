"""Every own allreduce algorithm equals native MPI on 1..8 ranks.

One mpiexec per rank count; the driver (tests/comm_driver.py allreduce) checks
all cases inside: lengths 0, 1, < p, p, p+1, odd and larger, float32 and
float64, against native within float rounding, bitwise identical on every
rank, bitwise identical on a second run; plus ring in reliable mode and tree
in lossy mode without faults.
"""
from __future__ import annotations

import pytest

from mpirun import REPO, mpiexec

DRIVER = str(REPO / "tests" / "comm_driver.py")


@pytest.mark.parametrize("nprocs", range(1, 9))
def test_algorithms_equal_native(nprocs):
    res = mpiexec(nprocs, [DRIVER, "allreduce"], timeout=90)
    assert res.returncode == 0, res.output[-3000:]
    assert f"ALLREDUCE OK p={nprocs}" in res.stdout
