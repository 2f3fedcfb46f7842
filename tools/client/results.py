"""What the client CLI makes of its results: the image list, a per-class table, JSON records, annotated pictures."""
from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Iterable, Sequence

import cv2
import numpy as np

from tools.client.annotate import draw_detections
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


def detections_record(path: Path, detections: Detections, labels: Sequence[str]) -> dict:
    """JSON-ready record of one image's detections."""
    return {
        "file": str(path),
        "detections": [
            {"box": [round(float(v), 2) for v in box], "class": labels[int(c)], "class_id": int(c),
             "score": round(float(s), 4)}
            for box, s, c in zip(detections.boxes, detections.scores, detections.classes)
        ],
    }


def detections_table(paths: Sequence[Path], results: Sequence[Detections | None], labels: Sequence[str],
                     failures: dict[str, str] | None = None) -> str:
    """A plain-text table: one row per image with its defect count per class."""
    failures = failures or {}
    names = [p.name for p in paths]
    name_width = max([len("image"), *map(len, names)])
    widths = [max(len(label), 3) for label in labels]
    header = f"{'image':<{name_width}}  {'total':>5}  " + "  ".join(f"{label:>{w}}" for label, w in zip(labels, widths))
    rows = [header, "-" * len(header)]
    for path, name, detections in zip(paths, names, results):
        if detections is None:
            rows.append(f"{name:<{name_width}}  FAILED: {failures.get(str(path), 'no result')}")
            continue
        counts = np.bincount(detections.classes, minlength=len(labels))
        rows.append(f"{name:<{name_width}}  {len(detections.classes):>5}  "
                    + "  ".join(f"{int(n) if n else '.':>{w}}" for n, w in zip(counts, widths)))
    return "\n".join(rows)


def write_annotated(paths: Sequence[Path], results: Sequence[Detections | None], labels: Sequence[str],
                    out_dir: Path) -> list[Path]:
    """Save each successfully processed image with its detections drawn, as ``out_dir/<stem>.png`` (``<stem>-2``,
    ``<stem>-3``, ... when files of different folders share a stem)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for path, detections in zip(paths, results):
        if detections is None:
            continue
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)  # applies EXIF orientation, like decoding for inference
        if image is None:
            raise ValueError(f"{path}: OpenCV cannot read this image to annotate it")
        target = out_dir / f"{path.stem}.png"
        for copy in itertools.count(2):
            if target not in written:
                break
            target = out_dir / f"{path.stem}-{copy}.png"
        cv2.imwrite(str(target), draw_detections(image, detections, labels))
        written.append(target)
    return written


def write_json(path: Path, paths: Sequence[Path], results: Sequence[Detections | None], labels: Sequence[str],
               failures: dict[str, str]) -> None:
    """One record per file, in input order: its detections, or the error that stopped it."""
    records = [detections_record(p, d, labels) if d is not None else {"file": str(p), "error": failures[str(p)]}
               for p, d in zip(paths, results)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, indent=2))
