"""Per-board design rules, drawn at random over the range DeepPCB's artwork spans."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Style:
    """Per-board design rules; DeepPCB crops range from fine (6 px traces) to coarse (45 px) artwork."""

    trace_width: float
    clearance: int
    pad_diameter: float
    via_diameter: float
    routed_fill: float  # copper fraction the traces, buses and pads add
    fill_target: float  # copper fraction that ground fills then top the board up to


def pick_style(rng: np.random.Generator) -> Style:
    trace_width = float(np.exp(rng.uniform(np.log(6), np.log(45))))
    return Style(
        trace_width=trace_width,
        clearance=round(max(5.0, trace_width * rng.uniform(0.6, 1.4))),
        pad_diameter=float(np.clip(trace_width * rng.uniform(2.0, 4.0), 18, 110)),
        via_diameter=float(np.clip(trace_width * rng.uniform(1.6, 2.2), 14, 50)),
        # DeepPCB's copper fraction has median ~1/3 and 5-95% range 0.07-0.72
        routed_fill=float(rng.uniform(0.02, 0.3)),
        fill_target=float(rng.beta(1.2, 2.4)),
    )
