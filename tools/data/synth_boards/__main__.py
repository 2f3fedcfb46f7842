"""Synthetic binarised PCB boards with labelled defects, written as a DeepPCB-format folder.

    python -m tools.data.synth_boards --out /tmp/synth --count 20 --size 640 --seed 0
    python -m tools.data.synth_boards --out /tmp/scan --count 1 --size 4096 --height 3072 --format png
"""
from __future__ import annotations

import argparse
from pathlib import Path

from tools.data.synth_boards.dataset import write_dataset


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.data.synth_boards", description=__doc__.split("\n\n")[0])
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
