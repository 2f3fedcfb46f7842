"""The copper mask a board is built on, with the clearance rule every placed net must keep."""
from __future__ import annotations

import cv2
import numpy as np

from tools.data.synth_boards.geometry import Net, Polygon, Stroke


def _grow(mask: np.ndarray, radius: float) -> np.ndarray:
    """``mask`` dilated by a disk of ``radius`` (via a distance transform: cost independent of radius)."""
    return (cv2.distanceTransform(1 - mask, cv2.DIST_L2, 5) <= radius).astype(np.uint8)


class Layout:
    """Copper being placed under a clearance rule: a net goes down only if it keeps clear of all others."""

    def __init__(self, width: int, height: int, clearance: int):
        self.width, self.height = width, height
        self.copper = np.zeros((height, width), np.uint8)
        self.keepout = np.zeros((height, width), np.uint8)  # copper grown by the clearance
        self.clearance = clearance
        self.margin = clearance + 2
        self.traces: list[Stroke] = []
        self.copper_pixels = 0
        self.placed_nets = 0

    @property
    def fill(self) -> float:
        return self.copper_pixels / self.copper.size

    def try_add(self, net: Net) -> bool:
        if self._hits_keepout(net):
            return False
        x1, y1, x2, y2 = net.bounds()
        x1, y1 = max(0, int(np.floor(x1)) - self.margin), max(0, int(np.floor(y1)) - self.margin)
        x2 = min(self.width, int(np.ceil(x2)) + self.margin + 1)
        y2 = min(self.height, int(np.ceil(y2)) + self.margin + 1)
        if x2 - x1 <= 2 * self.margin or y2 - y1 <= 2 * self.margin:
            return False
        origin = np.array([x1, y1], np.float64)
        local = np.zeros((y2 - y1, x2 - x1), np.uint8)
        for shape in net.copper:
            shape.draw(local, origin, 1)
        if not local.any() or (local & self.keepout[y1:y2, x1:x2]).any():
            return False
        self.keepout[y1:y2, x1:x2] |= _grow(local, self.clearance)
        for drill in net.drills:
            drill.draw(local, origin, 0)
        self.copper_pixels += int((local & (1 - self.copper[y1:y2, x1:x2])).sum())
        self.copper[y1:y2, x1:x2] |= local
        self.traces.extend(shape for shape in net.copper if isinstance(shape, Stroke))
        self.placed_nets += 1
        return True

    def _hits_keepout(self, net: Net) -> bool:
        """Cheap early rejection: does a vertex or centre (all of them copper) fall in the keepout?"""
        points = np.vstack([shape.points if isinstance(shape, (Stroke, Polygon)) else shape.center[None]
                            for shape in net.copper])
        xy = np.round(points).astype(np.int64)
        on_board = (xy[:, 0] >= 0) & (xy[:, 0] < self.width) & (xy[:, 1] >= 0) & (xy[:, 1] < self.height)
        xy = xy[on_board]
        return bool(self.keepout[xy[:, 1], xy[:, 0]].any())

    def flood(self, region: Polygon, min_width: int, min_area: int) -> None:
        """Pour copper over the free part of ``region`` (a clearance away from everything placed), as a
        ground fill does; slivers narrower than ``min_width`` and islands under ``min_area`` are left out."""
        x1, y1, x2, y2 = region.bounds()
        x1, y1 = max(0, int(np.floor(x1))), max(0, int(np.floor(y1)))
        x2, y2 = min(self.width, int(np.ceil(x2)) + 1), min(self.height, int(np.ceil(y2)) + 1)
        if x2 <= x1 or y2 <= y1:
            return
        local = np.zeros((y2 - y1, x2 - x1), np.uint8)
        region.draw(local, np.array([x1, y1], np.float64), 1)
        local &= 1 - self.keepout[y1:y2, x1:x2]
        opening = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (min_width, min_width))
        local = cv2.morphologyEx(local, cv2.MORPH_OPEN, opening)
        _, labels, stats, _ = cv2.connectedComponentsWithStats(local, connectivity=8)
        small = np.flatnonzero(stats[:, cv2.CC_STAT_AREA] < min_area)
        local[np.isin(labels, small[small > 0])] = 0
        self.keepout[y1:y2, x1:x2] |= _grow(local, self.clearance)
        self.copper_pixels += int(local.sum())
        self.copper[y1:y2, x1:x2] |= local
