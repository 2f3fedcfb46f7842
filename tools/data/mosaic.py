"""Stitch labelled DeepPCB boards into large scans, to measure tiled inference on real boards.

A line-scan camera images a whole panel; DeepPCB holds 640x640 crops. Placing ``columns x rows`` boards side
by side gives a scan at DeepPCB's own resolution with every defect labelled, so ``tools.eval.evaluate --tile`` on
the mosaics compares directly with the per-board figures. Boards are taken in list order; a last group
with fewer boards than the grid is left out and reported.

    python -m tools.data.mosaic --list trainval.txt --split val --columns 4 --rows 3 --out /tmp/mosaic_val
    python -m tools.eval --data /tmp/mosaic_val --list test.txt --tile --start-server
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm import tqdm

from tools.arguments import add_data_arguments, validation_split
from tools.data.deeppcb import Sample, read_grey, sample_id, write_list_file, write_sample
from tools.data.splits import select_samples

FIRST_GROUP = 98000  # mosaic group numbers stay clear of DeepPCB's real ones and of tools.data.synth_boards'


def stitch(images: Sequence[np.ndarray], columns: int) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Place equally sized images row-major, ``columns`` per row; returns the mosaic and each image's (x, y)."""
    height, width = images[0].shape[:2]
    if any(image.shape != images[0].shape for image in images):
        raise ValueError(f"boards must share one shape to be stitched; first is {images[0].shape}")
    rows = -(-len(images) // columns)
    mosaic = np.zeros((rows * height, columns * width, *images[0].shape[2:]), dtype=images[0].dtype)
    origins = [((i % columns) * width, (i // columns) * height) for i in range(len(images))]
    for image, (x, y) in zip(images, origins):
        mosaic[y : y + height, x : x + width] = image
    return mosaic, origins


def write_mosaics(samples: Sequence[Sample], columns: int, rows: int, out_dir: Path, list_file: str = "test.txt",
                  image_format: str = "png", progress: bool = True) -> tuple[Path, int]:
    """Write one mosaic per ``columns * rows`` boards; returns (list file, boards left out)."""
    per_mosaic = columns * rows
    count = len(samples) // per_mosaic
    written = []
    for index in tqdm(range(count), desc="mosaics", unit="mosaic", disable=not progress):
        boards = samples[index * per_mosaic : (index + 1) * per_mosaic]
        test, origins = stitch([read_grey(board.image_path) for board in boards], columns)
        template, _ = stitch([read_grey(board.template_path) for board in boards], columns)
        boxes = np.concatenate([board.boxes + np.array([x, y, x, y], np.float32) for board, (x, y) in
                                zip(boards, origins)])
        classes = np.concatenate([board.classes for board in boards])
        written.append(write_sample(out_dir, *sample_id(index, FIRST_GROUP), test, template, boxes, classes,
                                    image_format))
    return write_list_file(out_dir, written, list_file), len(samples) - count * per_mosaic


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_arguments(parser, default_list="trainval.txt", default_part="val")
    parser.add_argument("--columns", type=int, default=4)
    parser.add_argument("--rows", type=int, default=3)
    parser.add_argument("--format", choices=("png", "jpg"), default="png", help="image encoding of the mosaics")
    parser.add_argument("--out", type=Path, required=True, help="output folder (DeepPCB layout, list test.txt)")
    args = parser.parse_args(argv)
    if args.columns < 1 or args.rows < 1:
        parser.error("--columns and --rows must be at least 1")
    samples = select_samples(args.data, args.list, args.split, validation_split(args))
    if len(samples) < args.columns * args.rows:
        parser.error(f"{len(samples)} boards selected, fewer than one {args.columns}x{args.rows} mosaic")
    list_path, left_out = write_mosaics(samples, args.columns, args.rows, args.out, image_format=args.format)
    print(f"wrote {(len(samples) - left_out) // (args.columns * args.rows)} mosaics of {args.columns}x{args.rows} "
          f"boards to {args.out} (list: {list_path}); {left_out} boards left out")


if __name__ == "__main__":
    main()
