"""Pads and vias: the copper (and drill holes) a trace starts and ends on."""
from __future__ import annotations

import numpy as np

from tools.data.synth_boards.geometry import Disk, rounded_rect
from tools.data.synth_boards.style import Style


def either(rng: np.random.Generator, first, second):
    return first if rng.random() < 0.5 else second


def pad(center: np.ndarray, style: Style, rng: np.random.Generator, kind: str | None = None) -> tuple[list, list]:
    """A component pad: round with a drill (through-hole) or a rounded rectangle (SMD)."""
    kind = kind or either(rng, "round", "rect")
    if kind == "round":
        radius = style.pad_diameter / 2
        return [Disk(center, radius)], [Disk(center, radius * rng.uniform(0.35, 0.6))]
    half = np.array([style.pad_diameter * rng.uniform(0.35, 0.6), style.pad_diameter * rng.uniform(0.6, 1.2)])
    if rng.random() < 0.5:
        half = half[::-1]
    return [rounded_rect(center, half, min(half) * rng.uniform(0, 0.5))], []


def via(center: np.ndarray, style: Style) -> tuple[list, list]:
    return [Disk(center, style.via_diameter / 2)], [Disk(center, style.via_diameter * 0.22)]


def terminal(point: np.ndarray, style: Style, rng: np.random.Generator) -> tuple[list, list]:
    return via(point, style) if rng.random() < 0.4 else pad(point, style, rng)
