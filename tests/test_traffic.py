"""Traffic accounting: the bytes each algorithm puts on the network, against its formula
and against the volume model that `mpitrain simulate` prices."""
import json

import pytest

from mpirun import mpitrain
from mpitrain.comm.volume import bytes_sent

STEPS, LAYERS, FEATURES = 3, [16, 10], 64  # digits: 64 inputs


def grad_bytes() -> list[int]:
    """Each layer's gradient bytes (float32): fan_in * fan_out + fan_out."""
    sizes = [FEATURES, *LAYERS]
    return [4 * (a * b + b) for a, b in zip(sizes[:-1], sizes[1:])]


def total_sent(algorithm: str, p: int, n: int) -> int:
    """Payload bytes all ranks together send in one allreduce of n bytes (exact)."""
    if algorithm in ("ring", "tree"):  # every chunk (ring) or the buffer (tree) crosses P-1
        return 2 * (p - 1) * n          # links on the way in and again on the way out
    p2 = 1 << (p.bit_length() - 1)     # recursive doubling: p2 ranks exchange log2 rounds,
    return p2 * (p2.bit_length() - 1) * n + 2 * (p - p2) * n  # the others fold in and out


def run_job(tmp_path, algorithm, p):
    out = tmp_path / f"{algorithm}-{p}"
    res = mpitrain(p, ["run", "--set", f"run.steps={STEPS}", "--set", f"model.layers={LAYERS}",
                       "--set", f'sync.algorithm="{algorithm}"', "--set", f'run.out="{out}"'],
                   timeout=120)
    assert res.returncode == 0, res.output
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in steps if r["kind"] == "step"], json.loads((out / "traffic.json").read_text())


@pytest.mark.parametrize("p", [2, 3, 4])
@pytest.mark.parametrize("algorithm", ["ring", "recursive_doubling", "tree"])
def test_measured_bytes_match_each_algorithms_formula(tmp_path, algorithm, p):
    steps, traffic = run_job(tmp_path, algorithm, p)
    assert traffic["ranks"] == p and not traffic["modelled"]
    matrix = traffic["matrix_bytes"]
    assert all(matrix[r][r] == 0 for r in range(p))
    want = STEPS * sum(total_sent(algorithm, p, n) for n in grad_bytes())
    assert sum(map(sum, matrix)) == want
    # what each rank sent and received, summed, is the same traffic seen from both ends
    assert sum(r["bytes_sent"] for r in steps) == sum(matrix[0])
    layers = traffic["per_layer"]
    assert [layers[str(i)]["bytes"] for i in range(len(LAYERS))] == \
        [STEPS * total_sent(algorithm, p, n) for n in grad_bytes()]
    if algorithm == "ring":  # rank 0 sends about 2(P-1)/P of each buffer: simulate's model
        model = sum(bytes_sent("ring", p, n) for n in grad_bytes())
        assert all(abs(r["bytes_sent"] - model) <= 8 * p for r in steps), (steps[0], model)


def test_native_mpi_is_modelled_and_marked(tmp_path):
    steps, traffic = run_job(tmp_path, "native", 2)
    assert traffic["modelled"] and all(r["traffic"] == "modelled" for r in steps)
    assert all(r["bytes_sent"] == round(sum(bytes_sent("native", 2, n) for n in grad_bytes()))
               for r in steps)


def test_retransmissions_are_counted_apart(tmp_path):
    out = tmp_path / "lossy-links"
    res = mpitrain(2, ["run", "--set", f"run.steps={STEPS}", "--set", f"model.layers={LAYERS}",
                       "--set", 'sync.algorithm="ring"', "--set", 'faults.delivery="reliable"',
                       "--fault", "kind=drop,step=2,layer=0,src=1,count=1",
                       "--set", f'run.out="{out}"'], timeout=120)
    assert res.returncode == 0, res.output
    traffic = json.loads((out / "traffic.json").read_text())
    assert traffic["matrix_dropped"] == [[0, 0], [1, 0]]
    assert traffic["retransmitted_bytes"][1][0] > 0 and traffic["retransmitted_bytes"][0] == [0, 0]
    want = STEPS * sum(total_sent("ring", 2, n) for n in grad_bytes())
    assert sum(map(sum, traffic["matrix_bytes"])) == want  # first transmissions only
