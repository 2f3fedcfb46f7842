"""A copper mask rendered as a binarised scan: black copper on white, slightly rough edges, sub-pixel shift."""
from __future__ import annotations

import cv2
import numpy as np

EDGE_BLUR_SIGMA = 1.0
EDGE_NOISE_STD = 0.08  # in mask units after blurring: edges wander ~0.2 px, like a thresholded scan

_NOISE_SIGMA = 0.8
_NOISE_KERNEL_SIZE = 5
# std of uniform bytes after that blur: byte std times the 2-D kernel's L2 norm (= the 1-D kernel's squared)
_BLURRED_BYTE_NOISE_STD = float(
    np.sqrt((256**2 - 1) / 12) * (cv2.getGaussianKernel(_NOISE_KERNEL_SIZE, _NOISE_SIGMA) ** 2).sum()
)


def binarise(copper: np.ndarray, rng: np.random.Generator, shift: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """Render a copper mask as a thresholded scan: black copper on white, edges slightly rough, the whole
    image moved by a sub-pixel ``shift`` (x, y) as a second scan of the same board would be."""
    level = cv2.GaussianBlur(copper.astype(np.float32), (0, 0), EDGE_BLUR_SIGMA)
    if any(shift):
        translation = np.array([[1, 0, shift[0]], [0, 1, shift[1]]], np.float32)
        level = cv2.warpAffine(level, translation, level.shape[::-1], flags=cv2.INTER_LINEAR,
                               borderMode=cv2.BORDER_REPLICATE)
    # Smoothed uniform byte noise: nearly Gaussian after the blur and ~10x cheaper to draw on a big scan.
    noise = cv2.GaussianBlur(rng.integers(0, 256, copper.shape, dtype=np.uint8).astype(np.float32),
                             (_NOISE_KERNEL_SIZE, _NOISE_KERNEL_SIZE), _NOISE_SIGMA)
    noise -= 127.5
    noise *= EDGE_NOISE_STD / _BLURRED_BYTE_NOISE_STD
    return np.where(level + noise > 0.5, 0, 255).astype(np.uint8)
