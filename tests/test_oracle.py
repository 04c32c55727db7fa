"""The equivalence oracle: P ranks with per-rank batch b == one process with batch P*b.

The reference below is written independently of mpitrain's model and optimizer: per-sample
gradients by the chain rule in plain NumPy loops, float64, and textbook SGD / Adam.
"""
import json

import numpy as np
import pytest

from mpirun import mpitrain

GLOBAL_BATCH = 16
LAYERS = [6, 5, 3]


def softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


def reference_grads(params, xb, tb):
    """Mean over the batch of the per-sample gradients (tanh hidden, softmax + CE)."""
    grads = [(np.zeros_like(w), np.zeros_like(b)) for w, b in params]
    for x, t in zip(xb, tb):
        acts = [x]
        for i, (w, b) in enumerate(params):
            z = acts[-1] @ w + b
            acts.append(softmax(z) if i == len(params) - 1 else np.tanh(z))
        delta = acts[-1] - t
        for i in range(len(params) - 1, -1, -1):
            grads[i][0][...] += np.outer(acts[i], delta)
            grads[i][1][...] += delta
            if i:
                delta = (params[i][0] @ delta) * (1 - acts[i] ** 2)
    return [(gw / len(xb), gb / len(xb)) for gw, gb in grads]


def reference_train(params, x, t, batches, optim, lr):
    params = [(w.copy(), b.copy()) for w, b in params]
    m = [(np.zeros_like(w), np.zeros_like(b)) for w, b in params]
    v = [(np.zeros_like(w), np.zeros_like(b)) for w, b in params]
    for step, idx in enumerate(batches, start=1):
        grads = reference_grads(params, x[idx], t[idx])
        for i in range(len(params)):
            for j in range(2):
                g = grads[i][j]
                if optim == "sgd":
                    params[i][j][...] -= lr * g
                else:
                    m[i][j][...] = 0.9 * m[i][j] + 0.1 * g
                    v[i][j][...] = 0.999 * v[i][j] + 0.001 * g * g
                    mhat = m[i][j] / (1 - 0.9 ** step)
                    vhat = v[i][j] / (1 - 0.999 ** step)
                    params[i][j][...] -= lr * mhat / (np.sqrt(vhat) + 1e-8)
    return params


@pytest.fixture(scope="module")
def problem(tmp_path_factory):
    root = tmp_path_factory.mktemp("oracle")
    rng = np.random.default_rng(42)
    n = 100  # 6 full global batches of 16, then a tail of 4
    x = rng.normal(size=(n, 4))
    labels = rng.integers(0, 3, n)
    np.savez(root / "data.npz", x=x, y=labels)
    sizes = [4, *LAYERS]
    init = {}
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        init[f"layers.{i}.weight"] = rng.normal(0, 0.5, (a, b))
        init[f"layers.{i}.bias"] = rng.normal(0, 0.1, b)
    np.savez(root / "init.npz", **init)
    params = [(init[f"layers.{i}.weight"], init[f"layers.{i}.bias"]) for i in range(3)]
    job = root / "job.toml"
    job.write_text(f"""
[run]
seed = 7
steps = 8
[data]
source = "file"
path = "{root / 'data.npz'}"
val_fraction = 0.0
shuffle = false
[model]
layers = {LAYERS}
activation = "tanh"
output = "softmax"
loss = "cross_entropy"
init = "{root / 'init.npz'}"
dtype = "float64"
""")
    return root, job, x, np.eye(3)[labels], params


def run_ranks(problem, nprocs, name, *overrides):
    root, job, *_ = problem
    out = root / name
    res = mpitrain(nprocs, ["run", str(job), "--set", f'run.out="{out}"',
                            "--set", f"data.batch_size={GLOBAL_BATCH // nprocs}", *overrides],
                   timeout=90)
    assert res.returncode == 0, res.output
    with np.load(out / "model.npz") as z:
        return {k: z[k] for k in z.files}


def assert_matches(got, want):
    for i, (w, b) in enumerate(want):
        np.testing.assert_allclose(got[f"layers.{i}.weight"], w, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(got[f"layers.{i}.bias"], b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("optim,lr", [("sgd", 0.5), ("adam", 0.05)])
@pytest.mark.parametrize("nprocs", [1, 2, 4])
def test_ranks_equal_one_process_with_the_global_batch(problem, nprocs, optim, lr):
    _, _, x, t, params = problem
    # shuffle off, tail dropped: 6 steps per epoch, so step 7 starts epoch 1 from sample 0
    batches = [np.arange(k * 16, k * 16 + 16) for k in (0, 1, 2, 3, 4, 5, 0, 1)]
    want = reference_train(params, x, t, batches, optim, lr)
    got = run_ranks(problem, nprocs, f"{optim}-{nprocs}", "--set", f'optim.name="{optim}"',
                    "--set", f"optim.lr={lr}")
    assert_matches(got, want)


@pytest.mark.parametrize("algorithm", ["native", "ring", "recursive_doubling", "tree"])
@pytest.mark.parametrize("overlap", [True, False])
def test_every_algorithm_and_overlap_setting_trains_the_same(problem, algorithm, overlap):
    _, _, x, t, params = problem
    batches = [np.arange(k * 16, k * 16 + 16) for k in (0, 1, 2, 3, 4, 5, 0, 1)]
    want = reference_train(params, x, t, batches, "sgd", 0.5)
    got = run_ranks(problem, 4, f"{algorithm}-{overlap}", "--set", 'optim.name="sgd"',
                    "--set", "optim.lr=0.5", "--set", f'sync.algorithm="{algorithm}"',
                    "--set", f"sync.overlap={str(overlap).lower()}")
    assert_matches(got, want)


@pytest.mark.parametrize("nprocs", [2, 4])
def test_weighted_tail_keeps_the_global_mean(problem, nprocs):
    """The 4-sample tail lands on rank 0 alone (the other ranks get none of it): still exact."""
    _, _, x, t, params = problem
    batches = [np.arange(k * 16, min(k * 16 + 16, 100)) for k in range(7)] + [np.arange(16)]
    want = reference_train(params, x, t, batches, "sgd", 0.5)
    got = run_ranks(problem, nprocs, f"tail-{nprocs}", "--set", 'data.tail="weighted"',
                    "--set", 'optim.name="sgd"', "--set", "optim.lr=0.5")
    assert_matches(got, want)


def test_shuffled_runs_do_not_depend_on_the_rank_count(problem):
    a = run_ranks(problem, 1, "shuffle-1", "--set", "data.shuffle=true")
    b = run_ranks(problem, 4, "shuffle-4", "--set", "data.shuffle=true")
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-9, atol=1e-12)


# float64 gradient bytes of LAYERS = [6, 5, 3] after 4 inputs: layer 0 240, 1 280, 2 144
@pytest.mark.parametrize("algorithm", ["native", "ring", "tree"])
@pytest.mark.parametrize("bucket_bytes,fused", [(300, [(1, 2), (0, 0)]), (10**6, [(0, 2)])])
def test_fused_buckets_train_the_same(problem, algorithm, bucket_bytes, fused):
    root, _, x, t, params = problem
    batches = [np.arange(k * 16, k * 16 + 16) for k in (0, 1, 2, 3, 4, 5, 0, 1)]
    want = reference_train(params, x, t, batches, "sgd", 0.5)
    name = f"bucket-{algorithm}-{bucket_bytes}"
    got = run_ranks(problem, 4, name, "--set", 'optim.name="sgd"', "--set", "optim.lr=0.5",
                    "--set", f'sync.algorithm="{algorithm}"',
                    "--set", f"sync.bucket_bytes={bucket_bytes}")
    assert_matches(got, want)
    # one collective per bucket, named by its lowest layer, of the bucket's bytes
    sizes = {0: 240, 1: 280, 2: 144}
    records = [json.loads(line) for line in (root / name / "ledger-rank0.jsonl").read_text().splitlines()]
    step1 = [(r["layer"], r["bytes"]) for r in records if r.get("step") == 1]
    assert step1 == [(lo, sum(sizes[i] for i in range(lo, hi + 1))) for lo, hi in fused]
