"""Detections of one image, the one type every tool uses, and the box IoU that compares them.

Rows are in the pipeline's order (descending score, as postprocess emits them and as a DeepPCB results file
lists them): ``boxes`` (n, 4) float32 x1 y1 x2 y2 in original-image pixels, ``scores`` (n,) float32,
``classes`` (n,) int32, 0-based into the labels. ``registration`` is how the served registration placed the
board's template, when the request sent one (None otherwise): (4,) float32 ``dx, dy, angle, score`` from
pcb_pipeline, or (tiles, 4) from pcb_scan, one row per tile in tile order, each in its tile's pixels
(convention: models/preprocess/1/registration.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Detections:
    boxes: np.ndarray
    scores: np.ndarray
    classes: np.ndarray
    registration: np.ndarray | None = field(default=None, compare=False)  # of the whole image, not per row

    @classmethod
    def of(cls, boxes, scores, classes, registration=None) -> "Detections":
        """From any array-likes, in the canonical dtypes and shapes."""
        return cls(np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(scores, np.float32).reshape(-1),
                   np.asarray(classes, np.int32).reshape(-1),
                   None if registration is None else np.asarray(registration, np.float32))

    @classmethod
    def from_padded(cls, num_detections, boxes, scores, classes) -> list["Detections"]:
        """One per image of EfficientNMS-style batch arrays, where rows past NUM_DETECTIONS are padding."""
        counts = np.asarray(num_detections).reshape(-1)
        return [cls.of(boxes[i][:n], scores[i][:n], classes[i][:n]) for i, n in enumerate(int(c) for c in counts)]

    def __len__(self) -> int:
        return len(self.scores)

    def ranked(self) -> "Detections":
        """In descending score order (stable): the DeepPCB "file order" of a results file."""
        return self[np.argsort(-self.scores, kind="stable")]

    def above(self, score_threshold: float) -> "Detections":
        """What the pipeline keeps at ``score_threshold`` (see ``above_threshold``)."""
        return self[above_threshold(self.scores, score_threshold)]

    def __getitem__(self, selection) -> "Detections":
        return Detections(self.boxes[selection], self.scores[selection], self.classes[selection], self.registration)

    def with_registration(self, registration) -> "Detections":
        """The same detections, with the template's registration (see the module docstring)."""
        return Detections.of(self.boxes, self.scores, self.classes, registration)


def above_threshold(scores: np.ndarray, score_threshold: float) -> np.ndarray:
    """Mask of the scores the pipeline keeps at ``score_threshold``: strictly above it, compared at the
    scores' own precision (the postprocess compares float32 scores with the threshold cast to float32)."""
    scores = np.asarray(scores)
    return scores > scores.dtype.type(score_threshold)


def box_iou(boxes_a: np.ndarray, boxes_b: np.ndarray) -> np.ndarray:
    """IoU matrix (len(a), len(b)) of x1 y1 x2 y2 boxes, in float64 so thresholds like 0.33 compare exactly."""
    a = np.asarray(boxes_a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(boxes_b, dtype=np.float64).reshape(-1, 4)
    top_left = np.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = np.minimum(a[:, None, 2:], b[None, :, 2:])
    overlap = np.clip(bottom_right - top_left, 0.0, None)
    intersection = overlap[..., 0] * overlap[..., 1]
    area_a = np.prod(np.clip(a[:, 2:] - a[:, :2], 0.0, None), axis=1)
    area_b = np.prod(np.clip(b[:, 2:] - b[:, :2], 0.0, None), axis=1)
    union = area_a[:, None] + area_b[None, :] - intersection
    return np.divide(intersection, union, out=np.zeros_like(intersection), where=union > 0)
