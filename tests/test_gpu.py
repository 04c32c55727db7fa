"""GPU (CuPy) replicas: the same training as on the CPU, to float64 rounding.

Skipped, with the reason, where CuPy or a CUDA device is missing.
"""
import numpy as np
import pytest

from mpirun import mpitrain


def gpu_reason():
    try:
        import cupy
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return "no CUDA device visible"
    except Exception as exc:  # ImportError or a CUDA runtime error
        return f"CuPy cannot use a GPU here: {exc.__class__.__name__}: {exc}"
    return None


pytestmark = pytest.mark.skipif(gpu_reason() is not None, reason=str(gpu_reason()))


@pytest.mark.parametrize("nprocs", [1, 2])
def test_gpu_training_equals_cpu_training(tmp_path, nprocs):
    common = ["run", "--set", "run.steps=20", "--set", 'model.dtype="float64"',
              "--set", "data.shuffle=false"]
    outs = {}
    for device in ("cpu", "gpu"):
        out = tmp_path / device
        res = mpitrain(nprocs, [*common, "--set", f'run.device="{device}"',
                                "--set", f'run.out="{out}"'], timeout=180)
        assert res.returncode == 0, res.output
        with np.load(out / "model.npz") as z:
            outs[device] = {k: z[k] for k in z.files}
    for k, want in outs["cpu"].items():
        np.testing.assert_allclose(outs["gpu"][k], want, rtol=1e-9, atol=1e-12)
