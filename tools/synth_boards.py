"""Synthetic binarised PCB boards with labelled defects, written as a DeepPCB-format folder.

    python -m tools.synth_boards --out /tmp/synth --count 20 --size 640 --seed 0
    python -m tools.synth_boards --out /tmp/scan --count 1 --size 4096 --height 3072 --format png

Boards look like DeepPCB's: white substrate, black copper, at DeepPCB's scale (traces 6-45 px wide). The
artwork is routed at 0, 45 and 90 degrees: traces, parallel buses, rows of round (drilled) or rectangular
pads with fan-out traces, vias (rings) and copper pours, all kept a clearance apart. Defects of the six
DeepPCB classes are then drawn onto a copy; each label box is the bounding box of the pixels the defect
changed, padded like DeepPCB's boxes, and no two boxes overlap. Test and template are binarised separately
(slightly rough edges, as a scanned and thresholded board is) and misregistered by under a pixel, so away
from the defects they differ by a pixel at some edges, as DeepPCB pairs do.
"""
from __future__ import annotations

import argparse
import itertools
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from tools.deeppcb import CLASS_NAMES, sample_id, write_list_file, write_sample

OPEN, SHORT, MOUSEBITE, SPUR, COPPER, PIN_HOLE = range(len(CLASS_NAMES))

BOX_PADDING = 10  # DeepPCB boxes sit ~10 px (median) outside the changed pixels on every side
JPEG_QUALITY = 75  # DeepPCB JPEGs carry the IJG quality-75 quantisation tables
DEFECTS_PER_BOARD = (3, 12)  # per 640x640 area, DeepPCB's usual range; larger boards get proportionally more
REFERENCE_AREA = 640 * 640
SATURATED_AFTER_MISSES = 40  # routing attempts in a row that place nothing: the board is full
MAX_EXIT_RUN = 500  # px; a trace this close to the border may run off it, farther ones end at a pad or via
MIN_SOLID_PIXELS = 20  # changed pixels at least 3 px thick; thinner or smaller changes vanish in a scan
MAX_BRIDGE = 55  # px; the widest gap a short spans (DeepPCB short boxes reach ~90 px with padding)
FIRST_GROUP = 99000  # synthetic group numbers stay clear of DeepPCB's real ones
EDGE_BLUR_SIGMA = 1.0
EDGE_NOISE_STD = 0.08  # in mask units after blurring: edges wander ~0.2 px, like a thresholded scan
# Test and template are two scans aligned to within about a pixel, so their edges differ a little. Kept
# within a pixel: a larger shift could mask a small defect in the test-template difference.
REGISTRATION_ERROR_STD = 0.5
MAX_REGISTRATION_ERROR = 1.0

_NOISE_SIGMA = 0.8
_NOISE_KERNEL_SIZE = 5
# std of uniform bytes after that blur: byte std times the 2-D kernel's L2 norm (= the 1-D kernel's squared)
_BLURRED_BYTE_NOISE_STD = float(
    np.sqrt((256**2 - 1) / 12) * (cv2.getGaussianKernel(_NOISE_KERNEL_SIZE, _NOISE_SIGMA) ** 2).sum()
)
_SUBPIXEL_BITS = 4
_SUBPIXEL_SCALE = 1 << _SUBPIXEL_BITS
# The eight routing directions, 45 degrees apart, as unit vectors (x right, y down).
_DIRECTIONS = np.array([(np.cos(a), np.sin(a)) for a in np.arange(8) * np.pi / 4])
# Turns between route segments in 45-degree steps: mostly +-45, some +-90 or straight on (35/35/10/10/10 %).
_TURNS = np.repeat([-1, 1, -2, 2, 0], [7, 7, 2, 2, 2])


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


@dataclass(frozen=True)
class Board:
    """A defect-free board: copper mask (1 = copper) and the traces on it (where opens can be cut)."""

    copper: np.ndarray  # (H, W) uint8 in {0, 1}
    traces: list[Stroke]


@dataclass(frozen=True)
class BoardPair:
    """One generated sample: binarised grayscale images (copper black on white) and the defect labels."""

    test: np.ndarray  # (H, W) uint8
    template: np.ndarray  # (H, W) uint8
    boxes: np.ndarray  # (n, 4) float32, x1 y1 x2 y2 pixel corners on the test image
    classes: np.ndarray  # (n,) int64, 0-based into CLASS_NAMES


@dataclass(frozen=True)
class _Style:
    """Per-board design rules; DeepPCB crops range from fine (6 px traces) to coarse (45 px) artwork."""

    trace_width: float
    clearance: int
    pad_diameter: float
    via_diameter: float
    routed_fill: float  # copper fraction the traces, buses and pads add
    fill_target: float  # copper fraction that ground fills then top the board up to


def _grow(mask: np.ndarray, radius: float) -> np.ndarray:
    """``mask`` dilated by a disk of ``radius`` (via a distance transform: cost independent of radius)."""
    return (cv2.distanceTransform(1 - mask, cv2.DIST_L2, 5) <= radius).astype(np.uint8)


class _Layout:
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


# ---------------------------------------------------------------- artwork


def _pick_style(rng: np.random.Generator) -> _Style:
    trace_width = float(np.exp(rng.uniform(np.log(6), np.log(45))))
    return _Style(
        trace_width=trace_width,
        clearance=round(max(5.0, trace_width * rng.uniform(0.6, 1.4))),
        pad_diameter=float(np.clip(trace_width * rng.uniform(2.0, 4.0), 18, 110)),
        via_diameter=float(np.clip(trace_width * rng.uniform(1.6, 2.2), 14, 50)),
        # DeepPCB's copper fraction has median ~1/3 and 5-95% range 0.07-0.72
        routed_fill=float(rng.uniform(0.02, 0.3)),
        fill_target=float(rng.beta(1.2, 2.4)),
    )


def _either(rng: np.random.Generator, first, second):
    return first if rng.random() < 0.5 else second


def _route(start: np.ndarray, direction: int, rng: np.random.Generator, style: _Style, segments: int) -> np.ndarray:
    """A polyline from ``start`` turning by multiples of 45 degrees (never sharper than 90)."""
    points = [np.asarray(start, np.float64)]
    for _ in range(segments):
        diagonal = direction % 2 == 1
        if diagonal and rng.random() < 0.6:  # most diagonal runs are short corner chamfers
            length = rng.uniform(1.5, 5) * style.trace_width
        else:
            length = rng.uniform(4, 18) * style.trace_width + rng.uniform(20, 160)
        points.append(points[-1] + _DIRECTIONS[direction] * length)
        direction = (direction + _TURNS[rng.integers(len(_TURNS))]) % 8
    return np.array(points)


def _run_to_border(point: np.ndarray, direction: np.ndarray, layout: _Layout) -> float:
    """Distance from ``point`` along unit ``direction`` until it leaves the board."""
    runs = [
        ((size if step > 0 else 0) - coordinate) / step
        for coordinate, step, size in zip(point, direction, (layout.width, layout.height))
        if abs(step) > 1e-9
    ]
    return max(0.0, min(runs))


def _exit_run(points: np.ndarray, layout: _Layout, style: _Style) -> float | None:
    """How far the last segment must be extended to leave the board (the trace continues off this crop),
    or None when the border is too far for that to look like a plain run."""
    direction = _unit(points[-1] - points[-2])
    run = _run_to_border(points[-1], direction, layout)
    return run + style.trace_width if run <= MAX_EXIT_RUN else None


def _extend(points: np.ndarray, length: float) -> np.ndarray:
    """``points`` with the last segment lengthened by ``length`` (negative: shortened)."""
    points = points.copy()
    points[-1] += _unit(points[-1] - points[-2]) * length
    return points


def _unit(vector: np.ndarray) -> np.ndarray:
    return vector / np.linalg.norm(vector)


def _pad(center: np.ndarray, style: _Style, rng: np.random.Generator, kind: str | None = None) -> tuple[list, list]:
    """A component pad: round with a drill (through-hole) or a rounded rectangle (SMD)."""
    kind = kind or _either(rng, "round", "rect")
    if kind == "round":
        radius = style.pad_diameter / 2
        return [Disk(center, radius)], [Disk(center, radius * rng.uniform(0.35, 0.6))]
    half = np.array([style.pad_diameter * rng.uniform(0.35, 0.6), style.pad_diameter * rng.uniform(0.6, 1.2)])
    if rng.random() < 0.5:
        half = half[::-1]
    return [_rounded_rect(center, half, min(half) * rng.uniform(0, 0.5))], []


def _via(center: np.ndarray, style: _Style) -> tuple[list, list]:
    return [Disk(center, style.via_diameter / 2)], [Disk(center, style.via_diameter * 0.22)]


def _rounded_rect(center: np.ndarray, half: np.ndarray, corner: float) -> Polygon:
    arc = np.linspace(0, np.pi / 2, 6)
    points = []
    for quadrant, (sx, sy) in enumerate([(1, 1), (-1, 1), (-1, -1), (1, -1)]):
        corner_center = center + np.array([sx, sy]) * (half - corner)
        angles = arc + quadrant * np.pi / 2
        points.append(corner_center + corner * np.stack([np.cos(angles), np.sin(angles)], 1))
    return Polygon(np.vstack(points))


def _chamfered_rect(x1: float, y1: float, x2: float, y2: float, chamfers: np.ndarray) -> Polygon:
    """A copper pour outline with 45-degree corners."""
    a, b, c, d = chamfers
    return Polygon(np.array([
        (x1 + a, y1), (x2 - b, y1), (x2, y1 + b), (x2, y2 - c), (x2 - c, y2), (x1 + d, y2), (x1, y2 - d), (x1, y1 + a),
    ], np.float64))


def _terminal(point: np.ndarray, style: _Style, rng: np.random.Generator) -> tuple[list, list]:
    return _via(point, style) if rng.random() < 0.4 else _pad(point, style, rng)


def _add_trace(layout: _Layout, style: _Style, rng: np.random.Generator) -> None:
    """A point-to-point trace between pads/vias, or from a pad off the edge of the crop."""
    start = rng.uniform([0, 0], [layout.width, layout.height])
    points = _route(start, int(rng.integers(8)) // 2 * 2, rng, style, int(rng.integers(1, 5)))
    copper, drills = _terminal(start, style, rng)
    exit_run = _exit_run(points, layout, style)
    if exit_run is not None and rng.random() < 0.3:
        points = _extend(points, exit_run)
    else:
        end_copper, end_drills = _terminal(points[-1], style, rng)
        copper, drills = copper + end_copper, drills + end_drills
    layout.try_add(Net([Stroke(points, style.trace_width)] + copper, drills))


def _offset_polyline(points: np.ndarray, offset: float) -> np.ndarray | None:
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


def _add_bus(layout: _Layout, style: _Style, rng: np.random.Generator) -> None:
    """Parallel traces sharing one route. An end near the border runs off the crop; an end on the board
    finishes in a staggered fan of vias, which needs a wider pitch."""
    points = _route(rng.uniform([0, 0], [layout.width, layout.height]), int(rng.integers(4)) * 2, rng, style,
                    int(rng.integers(1, 4)))
    start_run, end_run = _exit_run(points[::-1], layout, style), _exit_run(points, layout, style)
    if start_run is not None:
        points = _extend(points[::-1], start_run)[::-1]
    if end_run is not None:
        points = _extend(points, end_run)
    width, clearance, via = style.trace_width, style.clearance, style.via_diameter
    pitch = width + clearance if start_run is not None and end_run is not None else (via + width) / 2 + clearance
    pitch += rng.uniform(0, 0.5) * width
    stagger = via + clearance
    for k in range(int(rng.integers(2, 9))):
        shifted = _offset_polyline(points, k * pitch)
        if shifted is None:
            continue
        copper, drills = [], []
        if start_run is None:
            shifted = _extend(shifted[::-1], -k * stagger)[::-1]
            copper, drills = _via(shifted[0], style)
        if end_run is None:
            shifted = _extend(shifted, k * stagger)
            end_copper, end_drills = _via(shifted[-1], style)
            copper, drills = copper + end_copper, drills + end_drills
        if (np.einsum("ij,ij->i", np.diff(shifted, axis=0), np.diff(points, axis=0)) > 0).all():
            layout.try_add(Net([Stroke(shifted, width)] + copper, drills))


def _add_pad_row(layout: _Layout, style: _Style, rng: np.random.Generator) -> None:
    """A component footprint: a row of pads, most with a fan-out trace leaving on one side."""
    kind = _either(rng, "round", "rect")
    pitch = style.pad_diameter * rng.uniform(1.0, 1.6) + style.clearance + style.trace_width
    along = rng.integers(2) * 2  # row runs along x (0) or y (2)
    side = (along + 2 * _either(rng, -1, 1)) % 8  # fan-out leaves perpendicular to the row
    jog = (side + _either(rng, -1, 1)) % 8
    first_run = rng.uniform(1.0, 3.0) * style.pad_diameter
    jog_run = rng.uniform(1.0, 4.0) * style.trace_width if rng.random() < 0.6 else 0.0
    origin = rng.uniform([0, 0], [layout.width, layout.height])
    for i in range(int(rng.integers(3, 10))):
        center = origin + _DIRECTIONS[along] * pitch * i
        copper, drills = _pad(center, style, rng, kind)
        if rng.random() < 0.8:
            points = [center, center + _DIRECTIONS[side] * first_run]
            if jog_run:
                points += [points[-1] + _DIRECTIONS[jog] * jog_run]
            points += [points[-1] + _DIRECTIONS[side] * rng.uniform(2, 12) * style.trace_width]
            points = np.array(points)
            exit_run = _exit_run(points, layout, style)
            if exit_run is not None and rng.random() < 0.5:
                points, end_copper, end_drills = _extend(points, exit_run), [], []
            else:
                end_copper, end_drills = _via(points[-1], style)
            trace = Net([Stroke(points, style.trace_width)] + copper + end_copper, drills + end_drills)
            if layout.try_add(trace):
                continue
        layout.try_add(Net(copper, drills))


def _add_pour(layout: _Layout, style: _Style, rng: np.random.Generator) -> None:
    """A large copper area (ground pour, big pad) with chamfered corners, sized to the board's fill."""
    largest = float(np.clip(1.5 * np.sqrt(style.fill_target * REFERENCE_AREA), 100, 520))
    size = rng.uniform(80, largest, 2)
    x1, y1 = rng.uniform([-size[0] / 2, -size[1] / 2], [layout.width, layout.height])
    chamfers = rng.uniform(0, 0.35 * size.min(), 4) * (rng.random(4) < 0.6)
    layout.try_add(Net([_chamfered_rect(x1, y1, x1 + size[0], y1 + size[1], chamfers)], []))


def _flood(layout: _Layout, style: _Style, rng: np.random.Generator) -> None:
    """A ground fill over part of the board, flowing around the routed copper, about as large as the
    copper still missing from the fill target."""
    missing = max(style.fill_target - layout.fill, 0.0) * layout.width * layout.height
    size = np.sqrt(missing) * rng.uniform(0.7, 1.4, 2) + 60
    x1, y1 = rng.uniform([-size[0] / 2, -size[1] / 2], [layout.width, layout.height])
    chamfers = rng.uniform(0, 0.3 * size.min(), 4) * (rng.random(4) < 0.5)
    region = _chamfered_rect(x1, y1, x1 + size[0], y1 + size[1], chamfers)
    layout.flood(region, round(style.trace_width), round(4 * style.trace_width**2))


def _add_mounting_pad(layout: _Layout, style: _Style, rng: np.random.Generator) -> None:
    center = rng.uniform([0, 0], [layout.width, layout.height])
    radius = rng.uniform(60, 200)
    drills = [Disk(center, radius * rng.uniform(0.2, 0.5))] if rng.random() < 0.5 else []
    layout.try_add(Net([Disk(center, radius)], drills))


# What routing adds next: point-to-point traces 60 %, buses 20 %, pad rows 20 %.
_BUILDERS = (_add_trace, _add_trace, _add_trace, _add_bus, _add_pad_row)


def render_board(width: int, height: int, rng: np.random.Generator) -> Board:
    """Route a defect-free board of ``width`` x ``height`` pixels."""
    style = _pick_style(rng)
    layout = _Layout(width, height, style.clearance)
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


# ---------------------------------------------------------------- defects


def _blob(center: np.ndarray, radius: float, rng: np.random.Generator, stretch: float = 1.0) -> Polygon:
    """An irregular, roughly convex blob: the shape of a stray copper speck, a hole or a bite."""
    count = 12
    angles = np.sort(rng.uniform(0, 2 * np.pi, count))
    radii = radius * (1 + rng.uniform(-0.35, 0.35, count))
    radii = (radii + np.roll(radii, 1) + np.roll(radii, -1)) / 3  # smooth neighbours so it reads as one lump
    points = np.stack([np.cos(angles) * radii * stretch, np.sin(angles) * radii], 1)
    turn = rng.uniform(0, np.pi)
    rotation = np.array([[np.cos(turn), -np.sin(turn)], [np.sin(turn), np.cos(turn)]])
    return Polygon(center + points @ rotation.T)


def _pixel(point: np.ndarray) -> tuple[int, int]:
    return round(point[0]), round(point[1])


def _rotate(vector: np.ndarray, angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([c * vector[0] - s * vector[1], s * vector[0] + c * vector[1]])


class _DefectPainter:
    """Draws defects one at a time onto a copy of the board, keeping their boxes apart."""

    def __init__(self, board: Board, rng: np.random.Generator):
        self.rng = rng
        self.clean = board.copper
        self.height, self.width = self.clean.shape
        self.defective = self.clean.copy()
        self.inside_distance = cv2.distanceTransform(self.clean, cv2.DIST_L2, 5)
        self.outside_distance = cv2.distanceTransform(1 - self.clean, cv2.DIST_L2, 5)
        self.labels = cv2.connectedComponents(self.clean, connectivity=8)[1]
        edges = self.clean & ~cv2.erode(self.clean, np.ones((3, 3), np.uint8))
        self.edge_points = np.flatnonzero(edges)
        self.traces = board.traces
        self.boxes: list[tuple[int, int, int, int]] = []
        self.classes: list[int] = []

    # -- sampling helpers

    def _copper_at(self, point: np.ndarray) -> int | None:
        x, y = _pixel(point)
        if 0 <= x < self.width and 0 <= y < self.height:
            return int(self.clean[y, x])
        return None

    def _random_edge(self) -> tuple[np.ndarray, np.ndarray] | None:
        """A copper edge pixel and the outward normal there (away from the copper's local centroid)."""
        if not len(self.edge_points):
            return None
        y, x = divmod(int(self.edge_points[self.rng.integers(len(self.edge_points))]), self.width)
        r = 5
        if not (r <= x < self.width - r and r <= y < self.height - r):
            return None
        window = self.clean[y - r:y + r + 1, x - r:x + r + 1].astype(np.float64)
        offsets = np.arange(-r, r + 1)
        weights = np.exp(-(offsets[:, None] ** 2 + offsets[None, :] ** 2) / (2 * 2.0**2)) * window
        inward = np.array([(weights * offsets[None, :]).sum(), (weights * offsets[:, None]).sum()])
        norm = np.linalg.norm(inward)
        if norm < 0.5 * weights.sum() / r:  # no clear side (a thin sliver): skip
            return None
        return np.array([x, y], np.float64), -inward / norm

    def _random_point_where(self, distance: np.ndarray, minimum: float, tries: int = 64) -> np.ndarray | None:
        """A random pixel where ``distance`` (inside or outside the copper) is at least ``minimum``;
        rejection sampling keeps this cheap on whole-board scans."""
        for _ in range(tries):
            x, y = int(self.rng.integers(self.width)), int(self.rng.integers(self.height))
            if distance[y, x] >= minimum:
                return np.array([x, y], np.float64)
        return None

    def _march(self, start: np.ndarray, direction: np.ndarray, limit: int) -> tuple[int, int | None]:
        """First step (1..limit) from ``start`` along ``direction`` where the clean board differs from the
        start pixel, with the value found there (None off the board); (limit + 1, start value) if none."""
        value = self._copper_at(start)
        for step in range(1, limit + 1):
            found = self._copper_at(start + direction * step)
            if found != value:
                return step, found
        return limit + 1, value

    def _span_on_board(self, start: np.ndarray, along: np.ndarray, length: float) -> tuple[float, float]:
        """The range of t in [0, length] for which start + t * along lies on the board."""
        first, last = 0.0, length
        for axis, size in ((0, self.width), (1, self.height)):
            if abs(along[axis]) < 1e-9:
                continue
            t0, t1 = sorted(((0 - start[axis]) / along[axis], (size - 1 - start[axis]) / along[axis]))
            first, last = max(first, t0), min(last, t1)
        return first, last

    def _only_own_copper(self, center: np.ndarray, radius: float, own_label: int) -> bool:
        """True when all copper within ``radius`` of ``center`` belongs to component ``own_label``."""
        (x, y), r = _pixel(center), int(np.ceil(radius))
        window = self.labels[max(0, y - r):y + r + 1, max(0, x - r):x + r + 1]
        return bool(np.isin(window, [0, own_label]).all())

    # -- the six classes; each returns the shapes to draw and the value to draw them in, or None

    def _open(self):
        if not self.traces:
            return None
        trace = self.traces[self.rng.integers(len(self.traces))]
        i = int(self.rng.integers(len(trace.points) - 1))
        a, b = trace.points[i], trace.points[i + 1]
        length = np.linalg.norm(b - a)
        width = trace.width
        gap = float(np.clip(width * self.rng.uniform(0.3, 1.0), 4, 16))
        if length < 2 * width + gap:
            return None
        along = (b - a) / length
        first, last = self._span_on_board(a, along, length)
        first, last = first + width + gap / 2, last - width - gap / 2
        if last <= first:
            return None
        center = a + along * self.rng.uniform(first, last)
        across = np.array([-along[1], along[0]])
        widths = []
        for probe in (center, center - along * gap, center + along * gap):
            if self._copper_at(probe) != 1:
                return None
            limit = int(width) + 6
            widths.append(self._march(probe, across, limit)[0] + self._march(probe, -across, limit)[0] - 1)
        if max(widths) - min(widths) > 2 or max(widths) > width + 3:
            return None  # not a plain stretch of this trace (a pad, a junction or other copper is here)
        slant = np.tan(self.rng.uniform(-0.45, 0.45))
        reach = max(widths) / 2 + 3
        offsets = np.linspace(-reach, reach, 5)
        near = [center + across * t + along * (slant * t - gap / 2 + self.rng.uniform(-1, 1)) for t in offsets]
        far = [center + across * t + along * (slant * t + gap / 2 + self.rng.uniform(-1, 1)) for t in offsets[::-1]]
        return [Polygon(np.array(near + far))], 0

    def _short(self):
        """Copper bridging a gap: from a substrate pixel, go both ways towards the nearest copper."""
        point = self._random_point_where(self.outside_distance, 1.5)
        if point is None:
            return None
        x, y = int(point[0]), int(point[1])
        if not (0 < x < self.width - 1 and 0 < y < self.height - 1) or self.outside_distance[y, x] > MAX_BRIDGE / 2:
            return None
        slope = np.array([
            self.outside_distance[y, x + 1] - self.outside_distance[y, x - 1],
            self.outside_distance[y + 1, x] - self.outside_distance[y - 1, x],
        ])
        if np.linalg.norm(slope) < 1e-6:
            return None
        direction = _rotate(-_unit(slope), self.rng.uniform(-0.3, 0.3))
        ahead, found_ahead = self._march(point, direction, MAX_BRIDGE)
        behind, found_behind = self._march(point, -direction, MAX_BRIDGE)
        if found_ahead != 1 or found_behind != 1 or ahead + behind > MAX_BRIDGE:
            return None
        end_a, end_b = point + direction * ahead, point - direction * behind
        (xa, ya), (xb, yb) = _pixel(end_a), _pixel(end_b)
        if self.labels[ya, xa] == self.labels[yb, xb]:
            return None  # both sides are the same conductor
        side = np.array([-direction[1], direction[0]])
        middle = (end_a + end_b) / 2 + side * self.rng.uniform(-3, 3)
        points = np.array([end_a + direction * 2, middle, end_b - direction * 2])
        return [Stroke(points, self.rng.uniform(3, 6))], 1

    def _mousebite(self):
        edge = self._random_edge()
        if edge is None:
            return None
        point, normal = edge
        thickness = self._march(point, -normal, 40)[0]
        if thickness < 12:
            return None
        tangent = np.array([-normal[1], normal[0]])
        shapes = []
        for _ in range(int(self.rng.integers(1, 4))):
            # bites reach 1.3-1.8 radii deep, under half the copper's thickness: nibbled, not cut through
            radius = self.rng.uniform(3, min(7.5, thickness / 4))
            center = point - normal * self.rng.uniform(0.3, 0.8) * radius + tangent * self.rng.uniform(-8, 8)
            shapes.append(_blob(center, radius, self.rng))
        return shapes, 0

    def _spur(self):
        edge = self._random_edge()
        if edge is None:
            return None
        point, normal = edge
        own = int(self.labels[int(point[1]), int(point[0])])
        if self.rng.random() < 0.6:  # a thin whisker
            direction = _rotate(normal, self.rng.uniform(-0.8, 0.8))
            length, width = self.rng.uniform(7, 18), self.rng.uniform(3, 5.5)
            tip = point + direction * length
            bend = (point + tip) / 2 + np.array([-direction[1], direction[0]]) * self.rng.uniform(-2, 2)
            shape, reach = Stroke(np.array([point - direction * 2, bend, tip]), width), tip
            clearance = width + 4
        else:  # a rounded bump
            radius = self.rng.uniform(4, 9)
            reach = point + normal * self.rng.uniform(0.3, 0.8) * radius
            shape, clearance = _blob(reach, radius, self.rng), 1.4 * radius + 4
        outward = reach - point
        free_run = np.linalg.norm(outward) + clearance
        if self._march(point + normal, normal, int(free_run))[1] == 1:
            return None  # copper right ahead (e.g. the far side of a drill hole)
        samples = [point + outward * t for t in np.linspace(0.5, 1, 4)]
        if not all(self._only_own_copper(p, clearance, own) for p in samples):
            return None  # it would touch another conductor: that is a short, not a spur
        return [shape], 1

    def _copper(self):
        radius = self.rng.uniform(3, 9)
        stretch = self.rng.uniform(1, 2)
        center = self._random_point_where(self.outside_distance, 1.4 * radius * stretch + 6)
        if center is None:
            return None
        return [_blob(center, radius, self.rng, stretch)], 1

    def _pin_hole(self):
        radius = self.rng.uniform(3, 7.5)
        stretch = self.rng.uniform(1, 1.8)
        center = self._random_point_where(self.inside_distance, 1.4 * radius * stretch + 3)
        if center is None:
            return None
        return [_blob(center, radius, self.rng, stretch)], 0

    # -- placement

    def try_paint(self, defect_class: int) -> bool:
        proposers = {
            OPEN: self._open, SHORT: self._short, MOUSEBITE: self._mousebite,
            SPUR: self._spur, COPPER: self._copper, PIN_HOLE: self._pin_hole,
        }
        proposal = proposers[defect_class]()
        if proposal is None:
            return False
        shapes, value = proposal
        bounds = Net(shapes, []).bounds()
        x1, y1 = max(0, int(np.floor(bounds[0])) - 2), max(0, int(np.floor(bounds[1])) - 2)
        x2 = min(self.width, int(np.ceil(bounds[2])) + 3)
        y2 = min(self.height, int(np.ceil(bounds[3])) + 3)
        if x2 <= x1 or y2 <= y1:
            return False
        before = self.defective[y1:y2, x1:x2]
        after = before.copy()
        for shape in shapes:
            shape.draw(after, np.array([x1, y1], np.float64), value)
        changed = after != before
        solid = cv2.morphologyEx(changed.astype(np.uint8), cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
        if solid.sum() < MIN_SOLID_PIXELS:
            return False
        ys, xs = np.nonzero(changed)
        box = (
            max(0, x1 + int(xs.min()) - BOX_PADDING),
            max(0, y1 + int(ys.min()) - BOX_PADDING),
            min(self.width, x1 + int(xs.max()) + 1 + BOX_PADDING),
            min(self.height, y1 + int(ys.max()) + 1 + BOX_PADDING),
        )
        if any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in self.boxes):
            return False
        self.defective[y1:y2, x1:x2] = after
        self.boxes.append(box)
        self.classes.append(defect_class)
        return True


def inject_defects(
    board: Board, count: int, rng: np.random.Generator, attempts_per_defect: int = 40
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw ``count`` defects of random classes onto a copy of the board's copper.

    Returns (defective copper mask, boxes (n, 4) float32, 0-based classes (n,)); n < count when a board has
    no room left (e.g. no copper wide enough for a pin-hole and no free space either).
    """
    painter = _DefectPainter(board, rng)
    for _ in range(count):
        defect_class = int(rng.integers(len(CLASS_NAMES)))
        for _ in range(attempts_per_defect):
            if painter.try_paint(defect_class):
                break
    boxes = np.array(painter.boxes, np.float32).reshape(-1, 4)
    return painter.defective, boxes, np.array(painter.classes, np.int64)


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


def generate_pair(width: int, height: int, rng: np.random.Generator) -> BoardPair:
    """One board: its defect-free template, the same board with defects, and the defect labels."""
    board = render_board(width, height, rng)
    low, high = DEFECTS_PER_BOARD
    scale = width * height / REFERENCE_AREA
    count = int(rng.integers(max(1, round(low * scale)), max(2, round(high * scale)) + 1))
    defective, boxes, classes = inject_defects(board, count, rng)
    misregistration = np.clip(rng.normal(0, REGISTRATION_ERROR_STD, 2), -MAX_REGISTRATION_ERROR, MAX_REGISTRATION_ERROR)
    misregistration = (float(misregistration[0]), float(misregistration[1]))
    test = binarise(defective, rng, misregistration)
    return BoardPair(test=test, template=binarise(board.copper, rng), boxes=boxes, classes=classes)


# ---------------------------------------------------------------- dataset folder


def board_rng(seed: int, index: int) -> np.random.Generator:
    """The generator for board ``index`` of a dataset made with ``seed`` (independent of the board count)."""
    return np.random.default_rng([seed, index])


def write_dataset(
    out_dir: Path,
    count: int,
    width: int = 640,
    height: int | None = None,
    seed: int = 0,
    image_format: str = "jpg",
    list_file: str = "test.txt",
    progress: bool = True,
) -> Path:
    """Write ``count`` synthetic boards as a DeepPCB-format folder; returns the list file's path.

    Board ``i`` is ``generate_pair(width, height, board_rng(seed, i))``, so a larger ``count`` extends a
    dataset without changing the boards already in it.
    """
    if image_format not in ("jpg", "png"):
        raise ValueError(f"image_format must be 'jpg' or 'png', got {image_format!r}")
    height = width if height is None else height
    samples = []
    for index in tqdm(range(count), desc="boards", unit="board", disable=not progress):
        pair = generate_pair(width, height, board_rng(seed, index))
        samples.append(write_sample(out_dir, *sample_id(index, FIRST_GROUP), pair.test, pair.template,
                                    pair.boxes, pair.classes, image_format, JPEG_QUALITY))
    return write_list_file(out_dir, samples, list_file)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder (DeepPCB layout)")
    parser.add_argument("--count", type=int, default=10, help="number of boards")
    parser.add_argument("--size", type=int, default=640, help="image width in pixels")
    parser.add_argument("--height", type=int, default=None, help="image height in pixels (default: --size)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--format", choices=("jpg", "png"), default="jpg", help="image encoding")
    parser.add_argument("--list-file", default="test.txt", help="name of the list file written in --out")
    args = parser.parse_args(argv)
    if args.count < 1 or args.size < 64 or (args.height is not None and args.height < 64):
        parser.error("--count must be >= 1 and image sides >= 64 px")
    list_path = write_dataset(args.out, args.count, args.size, args.height, args.seed, args.format, args.list_file)
    print(f"wrote {args.count} boards to {args.out} (list: {list_path})")


if __name__ == "__main__":
    main()
