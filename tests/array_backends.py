"""Array modules the shared xp code is tested with: NumPy always, CuPy only where a CUDA GPU is present."""
import numpy as np
import pytest


def _cupy_with_gpu():
    try:
        import cupy
    except ImportError:
        return None
    try:
        return cupy if cupy.cuda.runtime.getDeviceCount() > 0 else None
    except cupy.cuda.runtime.CUDARuntimeError:
        return None


CUPY = _cupy_with_gpu()

ARRAY_MODULES = [
    pytest.param(np, id="numpy"),
    pytest.param(CUPY, id="cupy", marks=[
        pytest.mark.gpu, pytest.mark.skipif(CUPY is None, reason="GPU-only: needs CuPy and a CUDA device")]),
]


def to_numpy(array) -> np.ndarray:
    """A NumPy copy of a NumPy or CuPy array."""
    return CUPY.asnumpy(array) if CUPY is not None else np.asarray(array)
