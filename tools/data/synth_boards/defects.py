"""The six DeepPCB defect classes drawn onto a copy of a clean board, each labelled with a padded box."""
from __future__ import annotations

import cv2
import numpy as np

from tools.data.deeppcb import CLASS_NAMES
from tools.data.synth_boards.board import Board
from tools.data.synth_boards.geometry import Net, Polygon, Stroke, pixel, rotate, unit

OPEN, SHORT, MOUSEBITE, SPUR, COPPER, PIN_HOLE = range(len(CLASS_NAMES))

BOX_PADDING = 10  # DeepPCB boxes sit ~10 px (median) outside the changed pixels on every side
MIN_SOLID_PIXELS = 20  # changed pixels at least 3 px thick; thinner or smaller changes vanish in a scan
MAX_BRIDGE = 55  # px; the widest gap a short spans (DeepPCB short boxes reach ~90 px with padding)


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
        x, y = pixel(point)
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
        (x, y), r = pixel(center), int(np.ceil(radius))
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
        direction = rotate(-unit(slope), self.rng.uniform(-0.3, 0.3))
        ahead, found_ahead = self._march(point, direction, MAX_BRIDGE)
        behind, found_behind = self._march(point, -direction, MAX_BRIDGE)
        if found_ahead != 1 or found_behind != 1 or ahead + behind > MAX_BRIDGE:
            return None
        end_a, end_b = point + direction * ahead, point - direction * behind
        (xa, ya), (xb, yb) = pixel(end_a), pixel(end_b)
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
            direction = rotate(normal, self.rng.uniform(-0.8, 0.8))
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


