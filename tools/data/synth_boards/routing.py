"""Trace paths routed at 0, 45 and 90 degrees, and where they may run off the board's edge."""
from __future__ import annotations

import itertools

import numpy as np

from tools.data.synth_boards.geometry import unit
from tools.data.synth_boards.layout import Layout
from tools.data.synth_boards.style import Style

MAX_EXIT_RUN = 500  # px; a trace this close to the border may run off it, farther ones end at a pad or via

# The eight routing directions, 45 degrees apart, as unit vectors (x right, y down).
DIRECTIONS = np.array([(np.cos(a), np.sin(a)) for a in np.arange(8) * np.pi / 4])
# Turns between route segments in 45-degree steps: mostly +-45, some +-90 or straight on (35/35/10/10/10 %).
_TURNS = np.repeat([-1, 1, -2, 2, 0], [7, 7, 2, 2, 2])


def route(start: np.ndarray, direction: int, rng: np.random.Generator, style: Style, segments: int) -> np.ndarray:
    """A polyline from ``start`` turning by multiples of 45 degrees (never sharper than 90)."""
    points = [np.asarray(start, np.float64)]
    for _ in range(segments):
        diagonal = direction % 2 == 1
        if diagonal and rng.random() < 0.6:  # most diagonal runs are short corner chamfers
            length = rng.uniform(1.5, 5) * style.trace_width
        else:
            length = rng.uniform(4, 18) * style.trace_width + rng.uniform(20, 160)
        points.append(points[-1] + DIRECTIONS[direction] * length)
        direction = (direction + _TURNS[rng.integers(len(_TURNS))]) % 8
    return np.array(points)


def _run_to_border(point: np.ndarray, direction: np.ndarray, layout: Layout) -> float:
    """Distance from ``point`` along unit ``direction`` until it leaves the board."""
    runs = [
        ((size if step > 0 else 0) - coordinate) / step
        for coordinate, step, size in zip(point, direction, (layout.width, layout.height))
        if abs(step) > 1e-9
    ]
    return max(0.0, min(runs))


def exit_run(points: np.ndarray, layout: Layout, style: Style) -> float | None:
    """How far the last segment must be extended to leave the board (the trace continues off this crop),
    or None when the border is too far for that to look like a plain run."""
    direction = unit(points[-1] - points[-2])
    run = _run_to_border(points[-1], direction, layout)
    return run + style.trace_width if run <= MAX_EXIT_RUN else None


def extend(points: np.ndarray, length: float) -> np.ndarray:
    """``points`` with the last segment lengthened by ``length`` (negative: shortened)."""
    points = points.copy()
    points[-1] += unit(points[-1] - points[-2]) * length
    return points


def offset_polyline(points: np.ndarray, offset: float) -> np.ndarray | None:
    """The polyline shifted sideways by ``offset`` (mitred corners); None when a segment would flip."""
    segments = np.diff(points, axis=0)
    units = segments / np.linalg.norm(segments, axis=1, keepdims=True)
    normals = np.stack([-units[:, 1], units[:, 0]], 1)
    shifts = [normals[0]]
    for n1, n2 in itertools.pairwise(normals):
        shifts.append((n1 + n2) / (1 + n1 @ n2))
    shifts.append(normals[-1])
    shifted = points + offset * np.array(shifts)
    if (np.einsum("ij,ij->i", np.diff(shifted, axis=0), segments) <= 0).any():
        return None
    return shifted
