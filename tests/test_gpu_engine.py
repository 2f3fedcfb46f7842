"""GPU only: build the TensorRT engine from the FP16 ONNX model and validate it against FP32 on real boards.

Runs where TensorRT and an NVIDIA GPU are (the engine-builder image, docs/gpu.md); everywhere else every test
here is skipped with the reason. Never run on the development machines of this project (no GPU there).
"""
from __future__ import annotations

import numpy as np
import pytest

from tools.data.board_batches import load_boards
from tools.data.splits import held_out_boards
from tools.engine.build import (
    DEFAULT_CONFIG,
    DEFAULT_ONNX,
    MissingRequirement,
    build,
    first_visible_device,
    import_tensorrt,
    query_gpu,
    read_max_batch_size,
)


def unavailable_reason() -> str | None:
    """Why the GPU tests cannot run here, or None when they can."""
    try:
        import_tensorrt()
        query_gpu(first_visible_device())
    except MissingRequirement as missing:
        return str(missing).splitlines()[0]
    return None


REASON = unavailable_reason()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(REASON is not None, reason=f"needs a GPU and TensorRT: {REASON}")]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    folder = tmp_path_factory.mktemp("engine")
    engine = folder / "model.plan"
    cache = build(DEFAULT_ONNX, engine, read_max_batch_size(DEFAULT_CONFIG), folder / "timing")
    return engine, cache


def test_engine_and_its_timing_cache_are_written(built):
    engine, cache = built
    assert engine.stat().st_size > 0
    assert cache.exists() and cache.stat().st_size > 0


def test_engine_agrees_with_the_fp32_model_on_real_boards(built):
    from tools import validate_engine

    assert validate_engine.main(["--engine", str(built[0]), "--boards", "32"]) == 0


def test_engine_runs_the_smallest_and_largest_profile_batch(built):
    from tools.engine.validate import tensorrt_runner

    max_batch = read_max_batch_size(DEFAULT_CONFIG)
    images, _ = load_boards(held_out_boards()[:max_batch])
    with tensorrt_runner(built[0]) as engine:
        for batch in (images[:1], images):
            output = engine(batch)
            assert output.shape[0] == len(batch) and output.shape[1] == 10
            assert np.isfinite(output).all()
