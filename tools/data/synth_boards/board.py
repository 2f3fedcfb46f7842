"""Defect-free board artwork: traces, buses, pad rows, vias and copper pours, routed until the board is full."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tools.data.synth_boards.footprints import either, pad, terminal, via
from tools.data.synth_boards.geometry import Disk, Net, Stroke, chamfered_rect
from tools.data.synth_boards.layout import Layout
from tools.data.synth_boards.routing import DIRECTIONS, exit_run, extend, offset_polyline, route
from tools.data.synth_boards.style import Style, pick_style

REFERENCE_AREA = 640 * 640  # a DeepPCB crop; counts per board scale with the area relative to it
SATURATED_AFTER_MISSES = 40  # routing attempts in a row that place nothing: the board is full


@dataclass(frozen=True)
class Board:
    """A defect-free board: copper mask (1 = copper) and the traces on it (where opens can be cut)."""

    copper: np.ndarray  # (H, W) uint8 in {0, 1}
    traces: list[Stroke]


def _add_trace(layout: Layout, style: Style, rng: np.random.Generator) -> None:
    """A point-to-point trace between pads/vias, or from a pad off the edge of the crop."""
    start = rng.uniform([0, 0], [layout.width, layout.height])
    points = route(start, int(rng.integers(8)) // 2 * 2, rng, style, int(rng.integers(1, 5)))
    copper, drills = terminal(start, style, rng)
    run_off = exit_run(points, layout, style)
    if run_off is not None and rng.random() < 0.3:
        points = extend(points, run_off)
    else:
        end_copper, end_drills = terminal(points[-1], style, rng)
        copper, drills = copper + end_copper, drills + end_drills
    layout.try_add(Net([Stroke(points, style.trace_width)] + copper, drills))


def _add_bus(layout: Layout, style: Style, rng: np.random.Generator) -> None:
    """Parallel traces sharing one route. An end near the border runs off the crop; an end on the board
    finishes in a staggered fan of vias, which needs a wider pitch."""
    points = route(rng.uniform([0, 0], [layout.width, layout.height]), int(rng.integers(4)) * 2, rng, style,
                   int(rng.integers(1, 4)))
    start_run, end_run = exit_run(points[::-1], layout, style), exit_run(points, layout, style)
    if start_run is not None:
        points = extend(points[::-1], start_run)[::-1]
    if end_run is not None:
        points = extend(points, end_run)
    width, clearance, via_diameter = style.trace_width, style.clearance, style.via_diameter
    if start_run is not None and end_run is not None:
        pitch = width + clearance
    else:
        pitch = (via_diameter + width) / 2 + clearance
    pitch += rng.uniform(0, 0.5) * width
    stagger = via_diameter + clearance
    for k in range(int(rng.integers(2, 9))):
        shifted = offset_polyline(points, k * pitch)
        if shifted is None:
            continue
        copper, drills = [], []
        if start_run is None:
            shifted = extend(shifted[::-1], -k * stagger)[::-1]
            copper, drills = via(shifted[0], style)
        if end_run is None:
            shifted = extend(shifted, k * stagger)
            end_copper, end_drills = via(shifted[-1], style)
            copper, drills = copper + end_copper, drills + end_drills
        if (np.einsum("ij,ij->i", np.diff(shifted, axis=0), np.diff(points, axis=0)) > 0).all():
            layout.try_add(Net([Stroke(shifted, width)] + copper, drills))


def _add_pad_row(layout: Layout, style: Style, rng: np.random.Generator) -> None:
    """A component footprint: a row of pads, most with a fan-out trace leaving on one side."""
    kind = either(rng, "round", "rect")
    pitch = style.pad_diameter * rng.uniform(1.0, 1.6) + style.clearance + style.trace_width
    along = rng.integers(2) * 2  # row runs along x (0) or y (2)
    side = (along + 2 * either(rng, -1, 1)) % 8  # fan-out leaves perpendicular to the row
    jog = (side + either(rng, -1, 1)) % 8
    first_run = rng.uniform(1.0, 3.0) * style.pad_diameter
    jog_run = rng.uniform(1.0, 4.0) * style.trace_width if rng.random() < 0.6 else 0.0
    origin = rng.uniform([0, 0], [layout.width, layout.height])
    for i in range(int(rng.integers(3, 10))):
        center = origin + DIRECTIONS[along] * pitch * i
        copper, drills = pad(center, style, rng, kind)
        if rng.random() < 0.8:
            points = [center, center + DIRECTIONS[side] * first_run]
            if jog_run:
                points += [points[-1] + DIRECTIONS[jog] * jog_run]
            points += [points[-1] + DIRECTIONS[side] * rng.uniform(2, 12) * style.trace_width]
            points = np.array(points)
            run_off = exit_run(points, layout, style)
            if run_off is not None and rng.random() < 0.5:
                points, end_copper, end_drills = extend(points, run_off), [], []
            else:
                end_copper, end_drills = via(points[-1], style)
            trace = Net([Stroke(points, style.trace_width)] + copper + end_copper, drills + end_drills)
            if layout.try_add(trace):
                continue
        layout.try_add(Net(copper, drills))


def _add_pour(layout: Layout, style: Style, rng: np.random.Generator) -> None:
    """A large copper area (ground pour, big pad) with chamfered corners, sized to the board's fill."""
    largest = float(np.clip(1.5 * np.sqrt(style.fill_target * REFERENCE_AREA), 100, 520))
    size = rng.uniform(80, largest, 2)
    x1, y1 = rng.uniform([-size[0] / 2, -size[1] / 2], [layout.width, layout.height])
    chamfers = rng.uniform(0, 0.35 * size.min(), 4) * (rng.random(4) < 0.6)
    layout.try_add(Net([chamfered_rect(x1, y1, x1 + size[0], y1 + size[1], chamfers)], []))


def _flood(layout: Layout, style: Style, rng: np.random.Generator) -> None:
    """A ground fill over part of the board, flowing around the routed copper, about as large as the
    copper still missing from the fill target."""
    missing = max(style.fill_target - layout.fill, 0.0) * layout.width * layout.height
    size = np.sqrt(missing) * rng.uniform(0.7, 1.4, 2) + 60
    x1, y1 = rng.uniform([-size[0] / 2, -size[1] / 2], [layout.width, layout.height])
    chamfers = rng.uniform(0, 0.3 * size.min(), 4) * (rng.random(4) < 0.5)
    region = chamfered_rect(x1, y1, x1 + size[0], y1 + size[1], chamfers)
    layout.flood(region, round(style.trace_width), round(4 * style.trace_width**2))


def _add_mounting_pad(layout: Layout, style: Style, rng: np.random.Generator) -> None:
    center = rng.uniform([0, 0], [layout.width, layout.height])
    radius = rng.uniform(60, 200)
    drills = [Disk(center, radius * rng.uniform(0.2, 0.5))] if rng.random() < 0.5 else []
    layout.try_add(Net([Disk(center, radius)], drills))


# What routing adds next: point-to-point traces 60 %, buses 20 %, pad rows 20 %.
_BUILDERS = (_add_trace, _add_trace, _add_trace, _add_bus, _add_pad_row)


def render_board(width: int, height: int, rng: np.random.Generator) -> Board:
    """Route a defect-free board of ``width`` x ``height`` pixels."""
    style = pick_style(rng)
    layout = Layout(width, height, style.clearance)
    area_factor = width * height / REFERENCE_AREA
    for _ in range(rng.poisson(0.5 * area_factor)):
        if layout.fill < style.fill_target / 2:  # leave the rest of the fill to ground pours around the routing
            _add_pour(layout, style, rng)
    for _ in range(rng.poisson(0.15 * area_factor)):
        _add_mounting_pad(layout, style, rng)
    routing_done_at = layout.fill + style.routed_fill
    misses = 0  # consecutive attempts that placed nothing: the board is full at this clearance
    for _ in range(int(300 * area_factor)):
        if layout.fill >= routing_done_at or misses >= SATURATED_AFTER_MISSES:
            break
        placed = layout.placed_nets
        _BUILDERS[rng.integers(len(_BUILDERS))](layout, style, rng)
        misses = 0 if layout.placed_nets > placed else misses + 1
    for _ in range(int(np.ceil(4 * area_factor))):
        if layout.fill >= style.fill_target:
            break
        _flood(layout, style, rng)
    return Board(layout.copper, layout.traces)
