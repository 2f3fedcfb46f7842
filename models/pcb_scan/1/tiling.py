"""Cutting a scan into overlapping tiles of the detector input's size, and putting the tiles' detections back.

The pipeline letterboxes every image to the detector input, so a 4096-px line-scan image would shrink a
30-px defect to 5 px. Tiles of the input size keep the scale the detector was trained at. A box touching a
tile edge that lies inside the scan is dropped: the overlap is wider than any defect, so a neighbouring tile
holds that defect whole. The same defect seen whole by two tiles is merged by class-aware NMS.

This is the one tile layout of the project: the pcb_scan model serves it, and tools/tests load this file.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np

EDGE_MARGIN = 2  # px: a box this close to an inner tile edge is taken as cut by it


@dataclass(frozen=True)
class Window:
    """A tile's place in the scan: columns x0..x1, rows y0..y1 (end exclusive)."""

    x0: int
    y0: int
    x1: int
    y1: int


def check_layout(size: int, overlap: int) -> None:
    if size < 1 or not 0 <= overlap < size:
        raise ValueError(f"tile size {size} and overlap {overlap}: need 0 <= overlap < size")


def tile_origins(length: int, size: int, overlap: int) -> list[int]:
    """Start offsets of tiles covering ``length``: steps of ``size - overlap``, the last one flush with the end."""
    if length <= size:
        return [0]
    return [*range(0, length - size, size - overlap), length - size]


def tile_windows(height: int, width: int, size: int, overlap: int) -> list[Window]:
    """Row-major tiles covering a height x width scan (a side shorter than the tile is one tile of that side)."""
    return [
        Window(x, y, min(x + size, width), min(y + size, height))
        for y in tile_origins(height, size, overlap)
        for x in tile_origins(width, size, overlap)
    ]


def cut_by_inner_edge(boxes: np.ndarray, window: Window, height: int, width: int) -> np.ndarray:
    """Mask of tile-local boxes that touch an edge of ``window`` lying inside the scan (not its border)."""
    tile_width, tile_height = window.x1 - window.x0, window.y1 - window.y0
    x1, y1, x2, y2 = np.asarray(boxes, np.float32).reshape(-1, 4).T
    return (
        ((window.x0 > 0) & (x1 <= EDGE_MARGIN))
        | ((window.y0 > 0) & (y1 <= EDGE_MARGIN))
        | ((window.x1 < width) & (x2 >= tile_width - EDGE_MARGIN))
        | ((window.y1 < height) & (y2 >= tile_height - EDGE_MARGIN))
    )


def merge_tiles(tile_boxes: Sequence[np.ndarray], tile_scores: Sequence[np.ndarray],
                tile_classes: Sequence[np.ndarray], windows: Sequence[Window], height: int, width: int,
                merge_iou: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scan-level (boxes, scores, classes), by descending score, from each tile's detections in tile pixels."""
    boxes, scores, classes = [], [], []
    for tile_box, tile_score, tile_class, window in zip(tile_boxes, tile_scores, tile_classes, windows, strict=True):
        tile_box = np.asarray(tile_box, np.float32).reshape(-1, 4)
        whole = ~cut_by_inner_edge(tile_box, window, height, width)
        boxes.append(tile_box[whole] + np.array([window.x0, window.y0, window.x0, window.y0], np.float32))
        scores.append(np.asarray(tile_score, np.float32)[whole])
        classes.append(np.asarray(tile_class, np.int32)[whole])
    boxes, scores, classes = np.concatenate(boxes), np.concatenate(scores), np.concatenate(classes)
    if len(windows) > 1 and len(scores):
        xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)
        keep = np.asarray(
            cv2.dnn.NMSBoxesBatched(xywh.tolist(), scores.tolist(), classes.tolist(), 0.0, merge_iou), dtype=int
        ).reshape(-1)
        boxes, scores, classes = boxes[keep], scores[keep], classes[keep]
    order = np.argsort(-scores, kind="stable")
    return boxes[order], scores[order], classes[order]
