"""The model's backward pass against finite differences, and the loss conventions."""
import itertools

import numpy as np
import pytest

from mpitrain.model import MLP

COMBOS = [(act, out, loss)
          for act, out, loss in itertools.product(("relu", "sigmoid", "tanh", "identity"),
                                                  ("identity", "softmax"),
                                                  ("mse", "cross_entropy"))
          if not (loss == "cross_entropy" and out == "identity")]


def make(act, out, loss, seed=0):
    rng = np.random.default_rng(seed)
    model = MLP(5, [7, 6, 3], act, out, loss, "float64")
    model.init("xavier", seed)
    for p in model.params:  # non-zero biases, so bias gradients are tested too
        p.bias[...] = rng.normal(0, 0.3, p.bias.shape)
    x = rng.normal(size=(9, 5))
    if loss == "cross_entropy":
        t = np.eye(3)[rng.integers(0, 3, 9)]
    else:
        t = rng.normal(size=(9, 3))
    return model, x, t


def loss_of(model, x, t, weight):
    return model.loss(model.forward(x), t, weight)[0]


@pytest.mark.parametrize("act,out,loss", COMBOS)
def test_gradients_match_finite_differences(act, out, loss):
    model, x, t = make(act, out, loss)
    weight = 1 / len(x)
    _, dz = model.loss(model.forward(x), t, weight)
    order = list(model.backward(dz))
    assert order == [2, 1, 0], "backward must hand layers over last layer first"
    h = 1e-6
    for i, (p, g) in enumerate(zip(model.params, model.grads)):
        analytic = g.flat.copy()
        numeric = np.empty_like(analytic)
        for j in range(p.flat.size):
            old = p.flat[j]
            p.flat[j] = old + h
            up = loss_of(model, x, t, weight)
            p.flat[j] = old - h
            down = loss_of(model, x, t, weight)
            p.flat[j] = old
            numeric[j] = (up - down) / (2 * h)
        np.testing.assert_allclose(analytic, numeric, rtol=1e-5, atol=1e-7,
                                   err_msg=f"layer {i} of {act}/{out}/{loss}")


def test_mse_is_half_mean_sum_of_squares():
    model, x, t = make("tanh", "identity", "mse")
    out = model.forward(x)
    value, _ = model.loss(out, t, 1 / len(x))
    assert value == pytest.approx(0.5 * ((out - t) ** 2).sum(axis=1).mean(), rel=1e-12)


def test_cross_entropy_is_mean_negative_log_likelihood():
    model, x, t = make("relu", "softmax", "cross_entropy")
    out = model.forward(x)
    value, _ = model.loss(out, t, 1 / len(x))
    expected = -np.log(out[np.arange(len(x)), t.argmax(axis=1)]).mean()
    assert value == pytest.approx(expected, rel=1e-12)


def test_parameter_file_round_trip_and_shape_errors(tmp_path):
    from mpitrain.errors import ConfigError
    model, x, _ = make("relu", "softmax", "cross_entropy")
    np.savez(tmp_path / "p.npz", **model.state())
    other = MLP(5, [7, 6, 3], "relu", "softmax", "cross_entropy", "float64")
    other.load_file(tmp_path / "p.npz")
    np.testing.assert_array_equal(other.forward(x), model.forward(x))
    state = model.state()
    assert state["layers.0.weight"].shape == (5, 7)  # (fan_in, fan_out), y = x @ W + b
    state["layers.1.weight"] = state["layers.1.weight"].T
    np.savez(tmp_path / "bad.npz", **state)
    with pytest.raises(ConfigError, match=r"layers.1.weight has shape \(6, 7\).*\(7, 6\)"):
        other.load_file(tmp_path / "bad.npz")


def test_float32_model_computes_in_float32():
    model = MLP(4, [3, 2], "relu", "softmax", "cross_entropy", "float32")
    model.init("he", 1)
    out = model.forward(np.ones((2, 4), np.float32))
    _, dz = model.loss(out, np.eye(2, dtype=np.float32), 0.5)
    list(model.backward(dz))
    assert out.dtype == np.float32 and model.grads[0].flat.dtype == np.float32


def test_learning_rate_schedules():
    from types import SimpleNamespace
    from mpitrain.optim import learning_rate
    cfg = SimpleNamespace(lr=0.1, schedule="step", step_size=10, gamma=0.5, warmup_steps=0)
    assert [learning_rate(cfg, s, 100) for s in (1, 10, 11, 21)] == [0.1, 0.1, 0.05, 0.025]
    cfg = SimpleNamespace(lr=0.1, schedule="cosine", step_size=1, gamma=1, warmup_steps=4)
    assert learning_rate(cfg, 2, 104) == pytest.approx(0.1 * 2 / 4)  # linear warm-up
    assert learning_rate(cfg, 5, 104) == pytest.approx(0.1)          # cosine starts at lr
    assert learning_rate(cfg, 104, 104) == pytest.approx(0.0, abs=1e-4)


def test_momentum_is_the_heavy_ball_update():
    from types import SimpleNamespace
    from mpitrain.optim import Optimizer
    cfg = SimpleNamespace(name="momentum", momentum=0.9, weight_decay=0.0)
    p = np.array([1.0, 2.0])
    opt = Optimizer(cfg, [p])
    opt.step([np.array([1.0, -1.0])], 0.1)
    opt.step([np.array([1.0, -1.0])], 0.1)
    # v1 = g, v2 = 0.9 g + g; p = p0 - 0.1 (v1 + v2)
    np.testing.assert_allclose(p, [1.0 - 0.1 * (1 + 1.9), 2.0 + 0.1 * (1 + 1.9)])


@pytest.mark.parametrize("name", ["sgd", "momentum", "adam"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_sliced_updates_are_bitwise_the_whole_buffer_updates(name, dtype):
    """Layers of several slices (and a ragged last one) update exactly as in one piece."""
    from types import SimpleNamespace
    from mpitrain.optim import BLOCK_BYTES, Optimizer
    cfg = SimpleNamespace(name=name, momentum=0.9, beta1=0.9, beta2=0.999, eps=1e-8,
                          weight_decay=0.01)
    block = BLOCK_BYTES // np.dtype(dtype).itemsize
    rng = np.random.default_rng(1)
    sizes = [3 * block + 5, 7, block]
    start = [rng.standard_normal(n).astype(dtype) for n in sizes]
    sliced = Optimizer(cfg, [p.copy() for p in start])
    whole = Optimizer(cfg, [p.copy() for p in start])
    whole._block, whole._tmp = max(sizes), np.empty(max(sizes), dtype)
    assert sliced._block == block
    for step in range(3):
        grads = [rng.standard_normal(n).astype(dtype) for n in sizes]
        sliced.step([g.copy() for g in grads], 0.01)
        whole.step([g.copy() for g in grads], 0.01)
    for a, b in zip(sliced.params, whole.params):
        assert a.tobytes() == b.tobytes()
    if name == "sgd":  # and both are the textbook update: p - lr * (g + wd * p)
        p, g = start[0].copy(), rng.standard_normal(sizes[0]).astype(dtype)
        Optimizer(cfg, [p]).step([g.copy()], 0.01)
        want = start[0] - (g + start[0] * np.asarray(0.01, dtype)) * np.asarray(0.01, dtype)
        np.testing.assert_array_equal(p, want)


def test_gradients_lie_in_one_arena_so_consecutive_layers_are_one_slice():
    model = MLP(5, [7, 6, 3], "relu", "softmax", "cross_entropy", "float64")
    for i, g in enumerate(model.grads):  # views, not copies: backward writes land in the arena
        g.flat[...] = i + 1
    assert np.shares_memory(model.grad_span(0, 2), model.grad_arena)
    assert model.grad_span(0, 2).size == model.grad_arena.size
    for lo, hi in [(0, 0), (1, 2), (0, 1), (2, 2)]:
        want = np.concatenate([model.grads[i].flat for i in range(hi, lo - 1, -1)])
        np.testing.assert_array_equal(model.grad_span(lo, hi), want)


def test_buckets_fill_from_the_last_layer_until_they_hold_bucket_bytes():
    from mpitrain.model import plan_buckets
    sizes = [240, 280, 144, 16]  # bytes of layers 0..3
    assert plan_buckets(sizes, 0) == [(3, 3), (2, 2), (1, 1), (0, 0)]
    assert plan_buckets(sizes, 150) == [(2, 3), (1, 1), (0, 0)]
    assert plan_buckets(sizes, 300) == [(1, 3), (0, 0)]
    assert plan_buckets(sizes, 500) == [(0, 3)]  # what is left joins layer 0's bucket
    assert plan_buckets(sizes, 10**9) == [(0, 3)]
