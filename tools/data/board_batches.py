"""Boards preprocessed exactly as the served pipeline does, for calibrating and checking builds.

Each encoded file goes through ``preprocess_as_served``, the same function the ``preprocess`` model serves, so
calibration sees what the engine will see in production. Take the boards from ``tools.data.splits``'s
``agreement_boards``: the ones the detector was not trained on, where it has any.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from tools.data.deeppcb import template_path_for
from tools.pipeline_math import preprocess_as_served


def load_boards(paths: list[Path], with_templates: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(detector inputs [N, C, H, W] of the served pixel type, letterbox geometry [N, 5]) of the given encoded files,
    each with its DeepPCB template (``tools.data.deeppcb.template_path_for``) when ``with_templates`` and it has
    one; without, as a request without a template is served."""
    if not paths:
        raise ValueError("no board images given")
    inputs = []
    for path in paths:
        template = template_path_for(path) if with_templates else None
        inputs.append(preprocess_as_served(Path(path).read_bytes(), template.read_bytes() if template else None))
    tensors, geometries, _ = zip(*inputs)
    return np.stack(tensors), np.stack(geometries).astype(np.float32)


def load_mixed_boards(paths: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """``load_boards`` for both kinds of request: every other board with its template, the rest alone."""
    if len(paths) < 2:
        return load_boards(paths)
    pairs, alone = load_boards(paths[::2]), load_boards(paths[1::2], with_templates=False)
    return np.concatenate([pairs[0], alone[0]]), np.concatenate([pairs[1], alone[1]])


def calibration_inputs(paths: list[Path]) -> np.ndarray:
    """Detector inputs of both kinds of request for every board: with its template, then alone (a detector
    that takes no template channel sees each board twice, harmlessly)."""
    return np.concatenate([load_boards(paths, with_templates)[0] for with_templates in (True, False)])
