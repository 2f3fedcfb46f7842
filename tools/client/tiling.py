"""Scans larger than the detector input, at their native resolution: cut into tiles, put detections back.

The pipeline letterboxes every image to the detector input (640x640), so a 4096-px line-scan image would
shrink a 30-px defect to 5 px. Tiling keeps the scale the detector was trained at: overlapping tiles of the
input size, each an ordinary pipeline request. Detections are shifted back into scan coordinates; a box
touching a tile edge that lies inside the scan is dropped, because the overlap is wider than any defect, so
a neighbouring tile holds that defect whole; the same defect seen whole by two tiles is merged by
class-aware NMS.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from tools.contract import served_contract

DEFAULT_OVERLAP = 192  # wider than the largest DeepPCB defect (170 px) plus EDGE_MARGIN
EDGE_MARGIN = 2  # px: a box this close to an inner tile edge is taken as cut by it


@dataclass(frozen=True)
class TileSpec:
    """Tiles of the detector input's size by default; duplicates across tiles are near-identical boxes, so
    they merge at the served NMS IoU."""

    size: int = field(default_factory=lambda: served_contract().input_size)
    overlap: int = DEFAULT_OVERLAP
    merge_iou: float = field(default_factory=lambda: served_contract().iou_threshold)

    def __post_init__(self):
        if self.size < 1 or not 0 <= self.overlap < self.size:
            raise ValueError(f"tile size {self.size} and overlap {self.overlap}: need 0 <= overlap < size")
        if not 0 < self.merge_iou <= 1:
            raise ValueError(f"merge IoU {self.merge_iou} must be in (0, 1]")


@dataclass(frozen=True)
class Window:
    """A tile's place in the scan: columns x0..x1, rows y0..y1 (end exclusive)."""

    x0: int
    y0: int
    x1: int
    y1: int


def tile_origins(length: int, size: int, overlap: int) -> list[int]:
    """Start offsets of tiles covering ``length``: steps of ``size - overlap``, the last one flush with the end."""
    if length <= size:
        return [0]
    return [*range(0, length - size, size - overlap), length - size]


def tile_windows(height: int, width: int, spec: TileSpec) -> list[Window]:
    """Row-major tiles covering a height x width scan (a side shorter than the tile is one tile of that side)."""
    return [
        Window(x, y, min(x + spec.size, width), min(y + spec.size, height))
        for y in tile_origins(height, spec.size, spec.overlap)
        for x in tile_origins(width, spec.size, spec.overlap)
    ]


def needs_tiling(height: int, width: int, spec: TileSpec) -> bool:
    return height > spec.size or width > spec.size


def read_tiles(path: Path, spec: TileSpec) -> tuple[list[bytes], tuple[list[Window], int, int] | None]:
    """What to send for one image file: the file itself when it fits one tile (layout None), else PNG tiles
    with their layout (windows, scan height, scan width)."""
    encoded = path.read_bytes()
    image = cv2.imdecode(np.frombuffer(encoded, np.uint8), cv2.IMREAD_COLOR)  # applies EXIF orientation
    if image is None:
        raise ValueError("OpenCV cannot decode this file as an image")
    height, width = image.shape[:2]
    if not needs_tiling(height, width, spec):
        return [encoded], None
    windows = tile_windows(height, width, spec)
    return [_encode_png(image[w.y0 : w.y1, w.x0 : w.x1]) for w in windows], (windows, height, width)


def _encode_png(tile: np.ndarray) -> bytes:
    ok, buffer = cv2.imencode(".png", tile)
    if not ok:
        raise ValueError("OpenCV could not encode a tile")
    return buffer.tobytes()


def cut_by_inner_edge(boxes: np.ndarray, window: Window, height: int, width: int) -> np.ndarray:
    """Mask of tile-local boxes that touch an edge of ``window`` lying inside the scan (not its border)."""
    tile_width, tile_height = window.x1 - window.x0, window.y1 - window.y0
    x1, y1, x2, y2 = boxes.T
    return (
        ((window.x0 > 0) & (x1 <= EDGE_MARGIN))
        | ((window.y0 > 0) & (y1 <= EDGE_MARGIN))
        | ((window.x1 < width) & (x2 >= tile_width - EDGE_MARGIN))
        | ((window.y1 < height) & (y2 >= tile_height - EDGE_MARGIN))
    )


def merge_tiles(tile_results: Sequence, windows: Sequence[Window], height: int, width: int,
                merge_iou: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scan-level (boxes, scores, classes), by descending score, from per-tile results that have ``boxes``
    (tile pixels, x1 y1 x2 y2), ``scores`` and ``classes``."""
    boxes, scores, classes = [], [], []
    for result, window in zip(tile_results, windows, strict=True):
        whole = ~cut_by_inner_edge(result.boxes, window, height, width)
        boxes.append(result.boxes[whole] + np.array([window.x0, window.y0, window.x0, window.y0], np.float32))
        scores.append(result.scores[whole])
        classes.append(result.classes[whole])
    boxes, scores, classes = np.concatenate(boxes), np.concatenate(scores), np.concatenate(classes)
    if len(windows) > 1 and len(scores):
        xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)
        keep = np.asarray(
            cv2.dnn.NMSBoxesBatched(xywh.tolist(), scores.tolist(), classes.tolist(), 0.0, merge_iou), dtype=int
        ).reshape(-1)
        boxes, scores, classes = boxes[keep], scores[keep], classes[keep]
    order = np.argsort(-scores, kind="stable")
    return boxes[order].astype(np.float32), scores[order].astype(np.float32), classes[order].astype(np.int32)
