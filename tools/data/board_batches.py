"""Boards preprocessed exactly as the served pipeline does, for calibrating and checking builds.

Each encoded file goes through ``preprocess_as_served``, the same function the ``preprocess`` model serves, so
calibration sees what the engine will see in production. Take the boards from ``tools.data.splits``'s
``held_out_boards``: the ones the detector was not trained on.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from tools.pipeline_math import preprocess_as_served


def load_boards(paths: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """(detector inputs [N, C, H, W] float32, letterbox geometry [N, 5]) of the given encoded image files."""
    if not paths:
        raise ValueError("no board images given")
    tensors, geometries = zip(*(preprocess_as_served(Path(path).read_bytes()) for path in paths))
    return np.stack(tensors).astype(np.float32), np.stack(geometries).astype(np.float32)
