"""tools.detections: the one Detections type of the tools, on hand-made cases."""
from __future__ import annotations

import numpy as np

from tools.detections import Detections


def test_batch_arrays_split_into_images_without_their_padding():
    boxes = np.zeros((2, 3, 4), np.float32)
    boxes[0, :2] = [[0, 0, 1, 1], [2, 2, 3, 3]]
    scores = np.array([[0.9, 0.8, 0.0], [0.0, 0.0, 0.0]], np.float32)
    classes = np.array([[1, 2, 0], [0, 0, 0]], np.int32)
    first, second = Detections.from_padded(np.array([[2], [0]]), boxes, scores, classes)
    assert first.boxes.shape == (2, 4) and first.classes.tolist() == [1, 2]
    assert len(second.scores) == 0


def test_ranked_orders_by_descending_score_and_keeps_ties_in_place():
    detections = Detections.of([[0, 0, 1, 1], [1, 1, 2, 2], [2, 2, 3, 3]], [0.5, 0.9, 0.5], [0, 1, 2])
    assert detections.ranked().classes.tolist() == [1, 0, 2]


def test_above_keeps_scores_strictly_above_the_threshold_at_float32():
    detections = Detections.of([[0, 0, 1, 1]] * 3, [0.55, 0.5500001, 0.6], [0, 0, 0])
    assert detections.above(0.55).scores.tolist() == detections.scores[1:].tolist()
    assert len(detections.above(0.6)) == 0
