"""Synthetic boards written as a DeepPCB-format folder, one independent generator per board."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from tools.data.deeppcb import sample_id, write_list_file, write_sample
from tools.data.synth_boards.pair import generate_pair

JPEG_QUALITY = 75  # DeepPCB JPEGs carry the IJG quality-75 quantisation tables
FIRST_GROUP = 99000  # synthetic group numbers stay clear of DeepPCB's real ones


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
