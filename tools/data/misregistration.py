"""Templates moved off their boards the way line-scan crops drift: a known shift and a small rotation, and the
local stretch no rigid registration takes up.

The training recipe misregisters templates before the served registration brings them back (so the detector
learns the registration's residual error), tools write such pairs to evaluate robustness, and tests check that
``REGISTRATION`` recovers the known offset. The convention is the served one (models/preprocess/1/registration.py).
``local_warp`` bends a registered template by a few pixels, smoothly, as a line-scan camera's speed jitter and
the board's own distortion do: DeepPCB's held-out designs show such 2-4 px fringes along traces after rigid
registration, and the detector must not read them as opens.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from tools.pipeline_math import registration


@dataclass(frozen=True)
class Misregistration:
    """Template pixel (x, y) moves to (x + dx, y + dy) after a rotation by ``angle`` degrees about the centre."""

    dx: float
    dy: float
    angle: float

    @classmethod
    def random(cls, rng: np.random.Generator, max_shift: float, max_angle: float) -> Misregistration:
        return cls(*rng.uniform(-max_shift, max_shift, 2), rng.uniform(-max_angle, max_angle))

    def apply(self, template: np.ndarray, fill: float) -> np.ndarray:
        """The template moved; where it had no pixels, ``fill``."""
        height, width = template.shape[:2]
        matrix = registration.rotation_about_centre(width, height, self.dx, self.dy, self.angle)
        return cv2.warpAffine(template, matrix, (width, height), flags=cv2.INTER_LINEAR,
                              borderMode=cv2.BORDER_CONSTANT, borderValue=fill)

    def expected_registration(self, width: int, height: int) -> tuple[float, float, float]:
        """(dx, dy, angle) that registering the moved template onto the original board should report."""
        matrix = registration.rotation_about_centre(width, height, self.dx, self.dy, self.angle)
        return registration.describe_transform(cv2.invertAffineTransform(matrix), width, height)


def local_warp(image: np.ndarray, rng: np.random.Generator, max_shift: float, cells: int = 4) -> np.ndarray:
    """``image`` moved by a smooth random displacement of at most ``max_shift`` pixels (a random share of it),
    varying over about ``cells`` periods across the image; the border repeats its edge pixels."""
    height, width = image.shape[:2]
    amplitude = rng.uniform(0, max_shift)
    fields = []
    for _ in range(2):  # x, then y
        coarse = rng.uniform(-1, 1, (cells + 1, cells + 1)).astype(np.float32)
        field = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
        peak = float(np.abs(field).max())
        fields.append(field * np.float32(amplitude / peak if peak > 0 else 0.0))
    return cv2.remap(image, registration.pixel_grid(height, width) + np.dstack(fields), None, cv2.INTER_LINEAR,
                     borderMode=cv2.BORDER_REPLICATE)
