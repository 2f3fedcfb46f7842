"""A model repository serving another detector: a temporary copy whose detector version folder holds the ONNX
files of a given folder instead of its own (``tools.eval --detector``), so one command measures, say, the
recipe's held-out-groups detector in the shipped pipeline without touching ``models/``."""
from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from tools.contract import served_contract


@contextlib.contextmanager
def repository_with_detector(models_root: Path, detector_dir: Path | None) -> Iterator[Path]:
    """``models_root`` itself without ``detector_dir``; else, for the duration, a copy of it whose detector
    version folder holds ``detector_dir``'s ``*.onnx`` files instead of its own. None of its own is left, nor its
    TensorRT engine, so a file the configs serve that ``detector_dir`` lacks fails the load by name rather than
    serving the old detector."""
    if detector_dir is None:
        yield Path(models_root)
        return
    detector_files = sorted(Path(detector_dir).glob("*.onnx"))
    if not detector_files:
        raise SystemExit(f"{detector_dir} holds no ONNX detector (*.onnx)")
    version_dir = served_contract(models_root=Path(models_root)).detector_version_dir

    def left_out(directory: str, names: list[str]) -> set[str]:
        own_detector = Path(directory) == version_dir
        return {name for name in names if name == "__pycache__" or name.endswith(".plan")
                or (own_detector and name.endswith(".onnx"))}

    with tempfile.TemporaryDirectory(prefix="pcb_repository_") as scratch:
        copy = Path(scratch) / Path(models_root).name
        shutil.copytree(models_root, copy, ignore=left_out)
        for detector_file in detector_files:
            shutil.copyfile(detector_file, copy / version_dir.relative_to(models_root) / detector_file.name)
        yield copy
