"""In-rank tests (pytest-mpi): run inside an MPI job by tests/test_in_rank.py.

    mpiexec -n P python -m pytest --with-mpi tests/in_rank

Every rank runs the same test on the real communicator; expectations are written in terms
of rank and size, so the same test holds at every communicator size.
"""
import numpy as np
import pytest

from mpitrain.comm.allreduce import ALGORITHMS, make_allreducer
from mpitrain.comm.guarded import GuardedComm
from mpitrain.comm.transport import Transport
from mpitrain.errors import DivergenceError
from mpitrain.sync import GradientSync, verify_replicas


@pytest.fixture
def comm():
    from mpi4py import MPI
    c = MPI.COMM_WORLD.Dup()
    yield c
    c.Free()


def rank_buffers(rank, sizes, dtype):
    """Layer buffers whose values depend on the rank (and so on the communicator size)."""
    return [np.arange(n, dtype=dtype) * (rank + 1) + 0.5 * rank for n in sizes]


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("overlap", [True, False])
def test_gradient_sync_sums_every_layer(comm, algorithm, overlap):
    rank, size = comm.Get_rank(), comm.Get_size()
    sizes = [7, 1, 0, 33]
    transport = None if algorithm == "native" else Transport(comm, deadline_s=20)
    grads = rank_buffers(rank, sizes, np.float64)
    sync = GradientSync(make_allreducer(algorithm, comm, transport), grads, overlap, transport)
    sync.begin(1)
    for layer in reversed(range(len(sizes))):  # as backward hands them over
        sync.layer_ready(layer)
    sync.finish()
    for n, got in zip(sizes, grads):
        want = sum(np.arange(n) * (r + 1) + 0.5 * r for r in range(size))
        np.testing.assert_allclose(got, want, rtol=1e-12)
    if transport is not None:
        transport.close()


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("overlap", [True, False])
def test_fused_buckets_sum_every_layer(comm, algorithm, overlap):
    from mpitrain.model import MLP
    from mpitrain.model import plan_buckets
    rank, size = comm.Get_rank(), comm.Get_size()
    model = MLP(3, [4, 1, 5, 2], dtype="float64")  # gradient bytes 128, 40, 80, 96
    for g, want in zip(model.grads, rank_buffers(rank, [g.flat.size for g in model.grads], np.float64)):
        g.flat[...] = want
    buckets = [(lo, hi, model.grad_span(lo, hi)) for lo, hi in plan_buckets(
        [g.flat.nbytes for g in model.grads], 150)]
    assert [(lo, hi) for lo, hi, _ in buckets] == [(2, 3), (0, 1)]
    transport = None if algorithm == "native" else Transport(comm, deadline_s=20)
    grads = [g.flat for g in model.grads]
    sync = GradientSync(make_allreducer(algorithm, comm, transport), grads, overlap, transport,
                        buckets=buckets)
    sync.begin(1)
    for layer in reversed(range(len(grads))):
        sync.layer_ready(layer)
    sync.finish()
    for got in grads:
        want = sum(np.arange(got.size) * (r + 1) + 0.5 * r for r in range(size))
        np.testing.assert_allclose(got, want, rtol=1e-12)
    if transport is not None:
        transport.close()


@pytest.mark.mpi(min_size=2)
def test_bucket_spans_must_be_the_gradients_themselves(comm):
    from mpitrain.model import MLP
    model = MLP(3, [4, 1, 5, 2], dtype="float64")
    grads = [g.flat for g in model.grads]
    ar = make_allreducer("native", comm, None)
    with pytest.raises(ValueError, match="not its gradient buffer"):  # a copy, not a view
        GradientSync(ar, grads, buckets=[(2, 3, model.grad_span(2, 3).copy()),
                                         (0, 1, model.grad_span(0, 1))])
    with pytest.raises(ValueError, match="not its gradient buffer"):  # first-layer-first order
        GradientSync(ar, grads, buckets=[(0, 3, np.concatenate(grads))])
    with pytest.raises(ValueError, match="do not cover"):
        GradientSync(ar, grads, buckets=[(2, 3, model.grad_span(2, 3))])


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("delivery", ["lossy", "strict"])
def test_buckets_keep_the_end_to_end_checks_per_layer(comm, delivery):
    from mpitrain.comm.checks import SumCheck
    from mpitrain.model import MLP, plan_buckets
    model = MLP(3, [4, 1, 5, 2], dtype="float64")
    for g in model.grads:
        g.flat[...] = np.arange(g.flat.size) * (comm.Get_rank() + 1)
    buckets = [(lo, hi, model.grad_span(lo, hi)) for lo, hi in plan_buckets(
        [g.flat.nbytes for g in model.grads], 150)]
    transport = Transport(comm, delivery=delivery, deadline_s=20)
    grads = [g.flat for g in model.grads]
    sync = GradientSync(make_allreducer("ring", comm, transport), grads, True, transport,
                        SumCheck(), buckets)
    sync.begin(1)
    for layer in reversed(range(len(grads))):
        sync.layer_ready(layer)
    sync.finish()
    assert sorted(sync.sum_check._local) == [0, 1, 2, 3]  # one check per layer, not per bucket
    sync.verify(1)  # sums agree: no error
    transport.close()


@pytest.mark.mpi(min_size=2)
def test_replica_check_names_the_rank_that_differs(comm):
    rank, size = comm.Get_rank(), comm.Get_size()
    params = [np.ones(5), np.ones(3)]
    guard = GuardedComm(comm, None, deadline_s=20)
    verify_replicas(guard, params, 0)  # identical: no error
    if rank == size - 1:
        params[1][2] += 1e-12  # one ulp-sized difference is still a different replica
    with pytest.raises(DivergenceError) as err:
        verify_replicas(guard, params, 7)
    assert err.value.layer == 1 and err.value.step == 7
    if size > 2:
        assert err.value.ranks == [size - 1]
