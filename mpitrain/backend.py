"""The array backend: NumPy on the CPU, CuPy on the GPU, and the copies between them.

Every piece of the harness that must know where an array lives asks here: the model and
optimizer write host copies into parameter files and checkpoints, the synchronizer stages
GPU gradients through pinned host buffers (the MPI wheels from PyPI are not CUDA-aware),
and the replica check hashes host bytes.  The GPU of a rank is chosen by its rank *on its
node*, so ranks placed round-robin over nodes still get one GPU each.
"""
from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np

from .errors import MpitrainError


def array_module(device: str, local_rank: int) -> ModuleType:
    """numpy for ``device`` "cpu"; for "gpu", cupy with this rank's GPU made current.

    ``local_rank`` is the rank among the ranks of this node: rank k of a node uses GPU
    ``k % count``.  Raises MpitrainError (with what to do) when no GPU is usable.
    """
    if device == "cpu":
        return np
    try:
        import cupy
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # ImportError, or CUDA driver/runtime errors
        raise MpitrainError(f"[run] device = \"gpu\" but CuPy cannot use a GPU here: {exc}",
                            hint="install the gpu extra (pip install -e '.[gpu]') on a machine "
                                 "with a CUDA GPU, or set run.device = \"cpu\"") from None
    if count == 0:
        raise MpitrainError("[run] device = \"gpu\" but no CUDA device is visible",
                            hint="set run.device = \"cpu\"")
    cupy.cuda.Device(local_rank % count).use()
    return cupy


def on_gpu(array: Any) -> bool:
    """Whether ``array`` lives in GPU memory (a CuPy array)."""
    return hasattr(array, "__cuda_array_interface__")


def to_host(array: Any, copy: bool = True) -> np.ndarray:
    """A NumPy array with ``array``'s values: a device-to-host copy of a GPU array; of a
    NumPy array a copy, or with ``copy=False`` the array itself (to read it at once)."""
    if on_gpu(array):
        return array.get()
    return np.array(array) if copy else np.asarray(array)


def pinned_like(array: Any) -> np.ndarray:
    """An uninitialised page-locked host array of ``array``'s shape and dtype: the fastest
    staging buffer between a GPU and MPI."""
    import cupyx
    return cupyx.empty_pinned(array.shape, array.dtype)
