"""Reading and writing datasets in DeepPCB layout.

A DeepPCB-format folder has a list file (``trainval.txt`` or ``test.txt``) with one pair per line::

    groupNNNNN/NNNNN/ID.jpg groupNNNNN/NNNNN_not/ID.txt

The image named in the list has no suffix on disk: ``ID_test.jpg`` is the inspected board and
``ID_temp.jpg`` its defect-free template. Each annotation line is ``x1 y1 x2 y2 class`` (commas are
accepted too) with classes 1..6; in memory classes are 0-based.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tools.contract import REPO_ROOT, served_contract

# The served labels (models/pcb_defect_detector/1/labels.txt) are the dataset classes, 1-based in its files.
CLASS_NAMES = served_contract().labels
# The dataset sits beside the checkout (../shared/datasets/deeppcb); DEEPPCB_ROOT points elsewhere.
DEFAULT_ROOT = Path(os.environ.get("DEEPPCB_ROOT", REPO_ROOT.parent / "shared" / "datasets" / "deeppcb"))


@dataclass(frozen=True)
class Sample:
    """One inspected board: its image, its template (may not exist) and its labelled defects."""

    image_path: Path
    template_path: Path
    annotation_path: Path
    boxes: np.ndarray  # (n, 4) float32, x1 y1 x2 y2 in pixels
    classes: np.ndarray  # (n,) int64, 0-based into CLASS_NAMES


def read_annotations(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Return (boxes, 0-based classes) from a DeepPCB annotation file."""
    rows = [line.replace(",", " ").split() for line in Path(path).read_text().splitlines() if line.strip()]
    values = np.array(rows, dtype=np.float64).reshape(-1, 5)
    classes = values[:, 4].astype(np.int64) - 1
    if ((classes < 0) | (classes >= len(CLASS_NAMES))).any():
        raise ValueError(f"{path}: class ids must be 1..{len(CLASS_NAMES)}")
    return values[:, :4].astype(np.float32), classes


def read_grey(path: Path) -> np.ndarray:
    """A board image as one 8-bit grey channel; OSError naming the file when it cannot be read."""
    import cv2

    image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if image is None:
        raise OSError(f"cannot read {path} as an image")
    return image


def template_path_for(image_path: Path, templates_dir: Path | None = None) -> Path | None:
    """The template of an inspected image, or None: in ``templates_dir`` (or beside the image) by DeepPCB
    naming (``X_test.jpg`` -> ``X_temp.jpg``), or in ``templates_dir`` under the image's own file name."""
    image_path = Path(image_path)
    folder = Path(templates_dir) if templates_dir is not None else image_path.parent
    candidates = [folder / image_path.name.replace("_test", "_temp", 1)] if "_test" in image_path.name else []
    if templates_dir is not None:
        candidates.append(folder / image_path.name)
    return next((path for path in candidates if path.is_file() and path != image_path), None)


def write_annotations(path: Path, boxes: np.ndarray, classes: np.ndarray) -> None:
    """Write boxes and 0-based classes as a DeepPCB annotation file (integer pixel corners, 1-based classes)."""
    lines = [
        f"{int(round(x1))} {int(round(y1))} {int(round(x2))} {int(round(y2))} {int(c) + 1}"
        for (x1, y1, x2, y2), c in zip(np.asarray(boxes).reshape(-1, 4), np.asarray(classes).reshape(-1))
    ]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("".join(line + "\n" for line in lines))


def read_split(root: Path = DEFAULT_ROOT, list_file: str = "trainval.txt") -> list[Sample]:
    """Read every sample listed in ``root/list_file``."""
    root = Path(root)
    samples = []
    for line in (root / list_file).read_text().splitlines():
        if not line.strip():
            continue
        image_entry, annotation_entry = line.split()
        stem = root / Path(image_entry).with_suffix("")
        suffix = Path(image_entry).suffix
        annotation_path = root / annotation_entry
        boxes, classes = read_annotations(annotation_path)
        samples.append(
            Sample(
                image_path=stem.with_name(stem.name + "_test" + suffix),
                template_path=stem.with_name(stem.name + "_temp" + suffix),
                annotation_path=annotation_path,
                boxes=boxes,
                classes=classes,
            )
        )
    return samples


def sample_id(index: int, first_group: int) -> tuple[str, str]:
    """(group, image id) of the ``index``-th board written by a tool, numbered like DeepPCB: group
    ``first_group + index // 1000``, id = group + a 3-digit counter."""
    group = f"{first_group + index // 1000:05d}"
    return group, f"{group}{index % 1000:03d}"


def write_sample(out_dir: Path, group: str, image_id: str, test: np.ndarray, template: np.ndarray,
                 boxes: np.ndarray, classes: np.ndarray, image_format: str = "png", jpeg_quality: int = 95) -> Sample:
    """Write one board in the DeepPCB layout: ``groupG/G/ID_test|_temp.FORMAT`` and ``groupG/G_not/ID.txt``."""
    import cv2

    image_dir = Path(out_dir) / f"group{group}" / group
    image_dir.mkdir(parents=True, exist_ok=True)
    test_path = image_dir / f"{image_id}_test.{image_format}"
    template_path = image_dir / f"{image_id}_temp.{image_format}"
    annotation_path = Path(out_dir) / f"group{group}" / f"{group}_not" / f"{image_id}.txt"
    encode = [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality] if image_format == "jpg" else []
    for path, image in ((test_path, test), (template_path, template)):
        if not cv2.imwrite(str(path), image, encode):
            raise OSError(f"cannot write {path}")
    write_annotations(annotation_path, boxes, classes)
    return Sample(test_path, template_path, annotation_path, boxes, classes)


def write_list_file(root: Path, samples: list[Sample], list_file: str) -> Path:
    """Write a DeepPCB list file in ``root`` naming ``samples`` (whose paths must lie under root)."""
    root = Path(root).resolve()
    lines = []
    for s in samples:
        image = s.image_path.resolve()
        listed = image.with_name(image.name.replace("_test", "", 1))
        lines.append(f"{listed.relative_to(root)} {s.annotation_path.resolve().relative_to(root)}")
    path = root / list_file
    path.write_text("".join(line + "\n" for line in lines))
    return path
