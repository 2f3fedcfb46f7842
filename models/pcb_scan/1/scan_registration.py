"""Registering a whole scan's template once, before both are cut into tiles.

A line-scan template drifts by tens of pixels and turns by up to about a degree against its scan. The turn
alone moves a tile 1,000 px from the scan centre by 17 px more, so tiles registered one by one would leave
the search range far from the centre. So the template is registered onto the whole scan here (registration.py,
the same file as preprocess's; this model's `registration_*` parameters), warped into the scan's frame, and
then cut with the scan's tile windows. The tile requests say so (`registered_template_parameter`): the pipeline
scores each tile's window where it lies instead of searching it again, which a tile's own artwork can mislead
(lines running along the tile match themselves shifted) and which would cost a registration per tile. Each
tile's REGISTRATION row is the scan's registration seen from that tile, with the tile's score: where that
window of the template went (the pipeline's convention, in the tile's pixels). The scan is registered as one
rigid piece (shift and turn); preprocess then bends each tile's window onto its tile by a few pixels
(`registration_local_max_shift`), which takes up a small stretch along the scan within a tile.
"""
from __future__ import annotations

import cv2
import numpy as np
from registration import describe_transform, register_template, rotation_about_centre
from tiling import Window


def grey(pixels: np.ndarray) -> np.ndarray:
    """A decoded scan (grey, or BGR as scan.decode_scan gives it) in grey."""
    return pixels if pixels.ndim == 2 else cv2.cvtColor(pixels, cv2.COLOR_BGR2GRAY)


def homogeneous(affine: np.ndarray) -> np.ndarray:
    return np.vstack([affine, [0.0, 0.0, 1.0]])


def register_scan_template(image: np.ndarray, template: np.ndarray, settings):
    """(the template in the scan's frame, grey uint8; the 3x3 map template pixel -> scan pixel). Raises
    registration.TemplateRejected as preprocess does (sizes, score, range)."""
    height, width = image.shape[:2]
    registered, (dx, dy, angle, _) = register_template(grey(image), grey(template), settings)
    return registered, homogeneous(rotation_about_centre(width, height, float(dx), float(dy), float(angle)))


def tile_registration(scan_map: np.ndarray, residual: np.ndarray, window: Window) -> np.ndarray:
    """The REGISTRATION row of one tile: where the template's window went, from the scan's map (template ->
    scan pixels) and the pipeline's row for the tile's window of the registered template (dx, dy, angle, score;
    zeros but the score for a template scored in place), in the tile's pixels; the score is the tile's."""
    width, height = window.x1 - window.x0, window.y1 - window.y0
    dx, dy, angle, score = (float(value) for value in residual)
    to_scan = homogeneous(np.array([[1.0, 0.0, window.x0], [0.0, 1.0, window.y0]]))
    tile_map = homogeneous(rotation_about_centre(width, height, dx, dy, angle))
    composed = tile_map @ np.linalg.inv(to_scan) @ scan_map @ to_scan  # template window -> scan -> tile -> tile
    return np.array([*describe_transform(composed[:2], width, height), score], dtype=np.float32)
