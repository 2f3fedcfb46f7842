"""What the client CLI makes of its results: the image list, a per-class table, JSON records, annotated pictures."""
from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Iterable, Sequence

import cv2
import numpy as np

from tools.client.annotate import draw_detections, side_by_side
from tools.contract import served_contract
from tools.detections import Detections

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"}


def find_images(inputs: Iterable[str | Path], recursive: bool = False) -> list[Path]:
    """Expand files and folders into image files (folders: sorted, by suffix); missing inputs raise."""
    images = []
    for item in map(Path, inputs):
        if item.is_dir():
            candidates = item.rglob("*") if recursive else item.iterdir()
            images += sorted(p for p in candidates if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif item.is_file():
            images.append(item)
        else:
            raise FileNotFoundError(f"no such file or folder: {item}")
    return images


def registration_record(registration: np.ndarray) -> dict:
    """dx, dy (px), angle (degrees) and score of one registration, rounded for people."""
    dx, dy, angle, score = (float(v) for v in np.asarray(registration).reshape(4))
    return {"dx": round(dx, 2), "dy": round(dy, 2), "angle": round(angle, 3), "score": round(score, 4)}


def registrations_record(registration: np.ndarray | None):
    """The JSON of a result's registration: None (no template), one record (an image) or one per tile (a scan,
    in tile order, each in its tile's pixels)."""
    if registration is None:
        return None
    registration = np.asarray(registration)
    if registration.ndim == 1:
        return registration_record(registration)
    return [{"tile": i, **registration_record(row)} for i, row in enumerate(registration)]


def detections_record(path: Path, detections: Detections, labels: Sequence[str]) -> dict:
    """JSON-ready record of one image's detections (and its template's registration, when one was sent)."""
    record = {
        "file": str(path),
        "detections": [
            {"box": [round(float(v), 2) for v in box], "class": labels[int(c)], "class_id": int(c),
             "score": round(float(s), 4)}
            for box, s, c in zip(detections.boxes, detections.scores, detections.classes)
        ],
    }
    if detections.registration is not None:
        key = "registration" if np.asarray(detections.registration).ndim == 1 else "registrations"
        record[key] = registrations_record(detections.registration)
    return record


def registration_cell(detections: Detections) -> str:
    """The table's template column: the registration score, the lowest tile's for a scan, or 'none'."""
    registration = detections.registration
    if registration is None:
        return "none"
    registration = np.asarray(registration)
    if registration.ndim == 1:
        return f"{float(registration[3]):.3f}"
    return f"min {float(registration[:, 3].min()):.3f}" if len(registration) else "no tiles"


def detections_table(paths: Sequence[Path], results: Sequence[Detections | None], labels: Sequence[str],
                     failures: dict[str, str] | None = None, templates: bool = False) -> str:
    """A plain-text table: one row per image with its defect count per class; with ``templates`` a last
    column, ``template``, with the registration score ('none' for an image inspected without a template;
    for a scan the lowest of its tiles')."""
    failures = failures or {}
    names = [p.name for p in paths]
    name_width = max([len("image"), *map(len, names)])
    widths = [max(len(label), 3) for label in labels]
    header = f"{'image':<{name_width}}  {'total':>5}  " + "  ".join(f"{label:>{w}}" for label, w in zip(labels, widths))
    if templates:
        header += f"  {'template':>9}"
    rows = [header, "-" * len(header)]
    for path, name, detections in zip(paths, names, results):
        if detections is None:
            rows.append(f"{name:<{name_width}}  FAILED: {failures.get(str(path), 'no result')}")
            continue
        counts = np.bincount(detections.classes, minlength=len(labels))
        row = f"{name:<{name_width}}  {len(detections.classes):>5}  " + "  ".join(
            f"{int(n) if n else '.':>{w}}" for n, w in zip(counts, widths))
        rows.append(row + (f"  {registration_cell(detections):>9}" if templates else ""))
    return "\n".join(rows)


def read_colour(source: Path | bytes) -> np.ndarray:
    """A BGR copy of an image file or of encoded bytes (EXIF orientation applied, like decoding for inference)."""
    if isinstance(source, bytes):
        image = cv2.imdecode(np.frombuffer(source, np.uint8), cv2.IMREAD_COLOR)
    else:
        image = cv2.imread(str(source), cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError(f"{source if not isinstance(source, bytes) else 'template'}: OpenCV cannot read this "
                         "image to annotate it")
    return image


def write_annotated(paths: Sequence[Path], results: Sequence[Detections | None], labels: Sequence[str],
                    out_dir: Path, templates: Sequence[Path | bytes | None] | None = None,
                    fill: float | None = None) -> list[Path]:
    """Save each successfully processed image with its detections drawn, as ``out_dir/<stem>.png`` (``<stem>-2``,
    ``<stem>-3``, ... when files of different folders share a stem). An image inspected with a template (one per
    path in ``templates``, a path, encoded bytes or None) is drawn beside it (``annotate.side_by_side``: the
    template registered as the server registered it, or as sent for a scan); ``fill`` (default: the served
    pad value) where the registered template has no pixels."""
    out_dir.mkdir(parents=True, exist_ok=True)
    templates = [None] * len(paths) if templates is None else list(templates)
    fill = served_contract().pad_value if fill is None else fill
    written = []
    for path, detections, template in zip(paths, results, templates, strict=True):
        if detections is None:
            continue
        image = read_colour(path)
        target = out_dir / f"{path.stem}.png"
        for copy in itertools.count(2):
            if target not in written:
                break
            target = out_dir / f"{path.stem}-{copy}.png"
        if template is not None and detections.registration is not None:
            picture = side_by_side(image, read_colour(template), detections, labels, fill)
        else:
            picture = draw_detections(image, detections, labels)
        cv2.imwrite(str(target), picture)
        written.append(target)
    return written


def write_json(path: Path, paths: Sequence[Path], results: Sequence[Detections | None], labels: Sequence[str],
               failures: dict[str, str], templates: Sequence[Path | None] | None = None) -> None:
    """One record per file, in input order: its detections, or the error that stopped it. With ``templates``
    (one path or None per file) each record also names its ``template`` and holds its ``registration`` (an
    image: dx, dy, angle, score; null without a template) or ``registrations`` (a scan: one per tile)."""
    records = [detections_record(p, d, labels) if d is not None else {"file": str(p), "error": failures[str(p)]}
               for p, d in zip(paths, results)]
    if templates is not None:
        for record, template, detections in zip(records, templates, results, strict=True):
            record["template"] = None if template is None else str(template)
            if detections is not None and detections.registration is None:
                record["registration"] = None
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, indent=2))
