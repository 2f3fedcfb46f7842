"""Real DeepPCB boards, preprocessed exactly as the served pipeline does, for calibrating and checking builds.

The boards come from the held-out part of DeepPCB trainval (``split_train_val``'s validation side, the
boards the detector was not trained on); each encoded file goes through ``preprocess_image``, the same
function the ``preprocess`` model serves, so calibration sees what the engine will see in production.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from tools.deeppcb import DEFAULT_ROOT, read_split, split_train_val
from tools.pipeline_math import preprocess_image


def held_out_boards(root: Path = DEFAULT_ROOT) -> list[Path]:
    """Inspected-board images (not templates) of the validation side of the trainval split, in file order."""
    _, validation = split_train_val(read_split(root, "trainval.txt"))
    return [sample.image_path for sample in validation]


def load_boards(paths: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """(images [N, 1, 640, 640] float32, letterbox geometry [N, 5]) of the given encoded image files."""
    if not paths:
        raise ValueError("no board images given")
    tensors, geometries = zip(*(preprocess_image(Path(path).read_bytes()) for path in paths))
    return np.stack(tensors).astype(np.float32), np.stack(geometries).astype(np.float32)
