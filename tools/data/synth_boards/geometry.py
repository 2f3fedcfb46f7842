"""Copper shapes drawn with sub-pixel precision, the nets they form, and small vector helpers."""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

_SUBPIXEL_BITS = 4
_SUBPIXEL_SCALE = 1 << _SUBPIXEL_BITS


def _fixed(points: np.ndarray) -> np.ndarray:
    """Points as OpenCV fixed-point integers (drawn with shift=_SUBPIXEL_BITS)."""
    return np.round(np.asarray(points, np.float64) * _SUBPIXEL_SCALE).astype(np.int32)


@dataclass(frozen=True)
class Stroke:
    """A routed trace: a polyline of constant width with round ends and joins."""

    points: np.ndarray  # (k, 2) float, x y
    width: float

    def bounds(self) -> tuple[float, float, float, float]:
        return (*(self.points.min(0) - self.width / 2), *(self.points.max(0) + self.width / 2))

    def draw(self, image: np.ndarray, origin: np.ndarray, value: int) -> None:
        thickness = max(1, round(self.width))
        cv2.polylines(image, [_fixed(self.points - origin)], False, value, thickness, cv2.LINE_8, _SUBPIXEL_BITS)


@dataclass(frozen=True)
class Disk:
    center: np.ndarray
    radius: float

    def bounds(self) -> tuple[float, float, float, float]:
        return (*(self.center - self.radius), *(self.center + self.radius))

    def draw(self, image: np.ndarray, origin: np.ndarray, value: int) -> None:
        center = tuple(int(v) for v in _fixed(self.center - origin))
        cv2.circle(image, center, round(self.radius * _SUBPIXEL_SCALE), value, -1, cv2.LINE_8, _SUBPIXEL_BITS)


@dataclass(frozen=True)
class Polygon:
    points: np.ndarray  # (k, 2) float, filled

    def bounds(self) -> tuple[float, float, float, float]:
        return (*self.points.min(0), *self.points.max(0))

    def draw(self, image: np.ndarray, origin: np.ndarray, value: int) -> None:
        cv2.fillPoly(image, [_fixed(self.points - origin)], value, cv2.LINE_8, _SUBPIXEL_BITS)


@dataclass
class Net:
    """Copper that is electrically one piece, placed or rejected as a whole; drills are cut out after."""

    copper: list
    drills: list

    def bounds(self) -> np.ndarray:
        b = np.array([shape.bounds() for shape in self.copper])
        return np.array([b[:, 0].min(), b[:, 1].min(), b[:, 2].max(), b[:, 3].max()])


def rounded_rect(center: np.ndarray, half: np.ndarray, corner: float) -> Polygon:
    arc = np.linspace(0, np.pi / 2, 6)
    points = []
    for quadrant, (sx, sy) in enumerate([(1, 1), (-1, 1), (-1, -1), (1, -1)]):
        corner_center = center + np.array([sx, sy]) * (half - corner)
        angles = arc + quadrant * np.pi / 2
        points.append(corner_center + corner * np.stack([np.cos(angles), np.sin(angles)], 1))
    return Polygon(np.vstack(points))


def chamfered_rect(x1: float, y1: float, x2: float, y2: float, chamfers: np.ndarray) -> Polygon:
    """A copper pour outline with 45-degree corners."""
    a, b, c, d = chamfers
    return Polygon(np.array([
        (x1 + a, y1), (x2 - b, y1), (x2, y1 + b), (x2, y2 - c), (x2 - c, y2), (x1 + d, y2), (x1, y2 - d), (x1, y1 + a),
    ], np.float64))


def unit(vector: np.ndarray) -> np.ndarray:
    return vector / np.linalg.norm(vector)


def rotate(vector: np.ndarray, angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([c * vector[0] - s * vector[1], s * vector[0] + c * vector[1]])


def pixel(point: np.ndarray) -> tuple[int, int]:
    return round(point[0]), round(point[1])
