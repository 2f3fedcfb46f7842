"""One labelled sample: a board's template scan and a misregistered scan of it with defects."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tools.data.synth_boards.board import REFERENCE_AREA, render_board
from tools.data.synth_boards.defects import inject_defects
from tools.data.synth_boards.scan import binarise

DEFECTS_PER_BOARD = (3, 12)  # per 640x640 area, DeepPCB's usual range; larger boards get proportionally more
# Test and template are two scans aligned to within about a pixel, so their edges differ a little. Kept
# within a pixel: a larger shift could mask a small defect in the test-template difference.
REGISTRATION_ERROR_STD = 0.5
MAX_REGISTRATION_ERROR = 1.0


@dataclass(frozen=True)
class BoardPair:
    """One generated sample: binarised grayscale images (copper black on white) and the defect labels."""

    test: np.ndarray  # (H, W) uint8
    template: np.ndarray  # (H, W) uint8
    boxes: np.ndarray  # (n, 4) float32, x1 y1 x2 y2 pixel corners on the test image
    classes: np.ndarray  # (n,) int64, 0-based into CLASS_NAMES


def generate_pair(width: int, height: int, rng: np.random.Generator) -> BoardPair:
    """One board: its defect-free template, the same board with defects, and the defect labels."""
    board = render_board(width, height, rng)
    low, high = DEFECTS_PER_BOARD
    scale = width * height / REFERENCE_AREA
    count = int(rng.integers(max(1, round(low * scale)), max(2, round(high * scale)) + 1))
    defective, boxes, classes = inject_defects(board, count, rng)
    misregistration = np.clip(rng.normal(0, REGISTRATION_ERROR_STD, 2), -MAX_REGISTRATION_ERROR, MAX_REGISTRATION_ERROR)
    misregistration = (float(misregistration[0]), float(misregistration[1]))
    test = binarise(defective, rng, misregistration)
    return BoardPair(test=test, template=binarise(board.copper, rng), boxes=boxes, classes=classes)
