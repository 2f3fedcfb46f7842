"""Command-line argument groups that several tools share, so each flag is defined once.

Each ``add_*`` adds a group to a parser; ``validation_split`` turns the parsed split flags into the
library's ``ValidationSplit``.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from tools.contract import MODELS_ROOT
from tools.data.deeppcb import DEFAULT_ROOT
from tools.data.splits import DEFAULT_SPLIT, PARTS, ValidationSplit

DEFAULT_GRPC_URL = "localhost:8001"


def add_data_arguments(parser: argparse.ArgumentParser, default_list: str, default_part: str | None) -> None:
    """--data and --list; with ``default_part`` also --split and the split's --val-fraction/--split-seed."""
    group = parser.add_argument_group("boards")
    group.add_argument("--data", type=Path, default=DEFAULT_ROOT, help="DeepPCB-format folder")
    group.add_argument("--list", default=default_list, help="list file inside --data (trainval.txt, test.txt)")
    if default_part is not None:
        group.add_argument("--split", choices=PARTS, default=default_part, help="part of the list to use")
    add_split_arguments(group)


def add_split_arguments(parser) -> None:
    parser.add_argument("--val-fraction", type=float, default=DEFAULT_SPLIT.fraction,
                        help="share of the list held out for validation")
    parser.add_argument("--split-seed", type=int, default=DEFAULT_SPLIT.seed, help="seed of the validation draw")
    parser.add_argument("--val-groups", nargs="*", default=list(DEFAULT_SPLIT.groups), metavar="GROUP",
                        help="hold out these whole groups (board designs) instead of a random draw (default: the "
                             "groups the recipe is validated on, %(default)s); give none for a random draw of "
                             "--val-fraction, and none with --val-fraction 0 to hold out no board")


def validation_split(args: argparse.Namespace) -> ValidationSplit:
    return ValidationSplit(args.val_fraction, args.split_seed, tuple(args.val_groups))


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    """--url, --start-server, --model-repository: which Triton to talk to, or one to start for the run."""
    group = parser.add_argument_group("server")
    group.add_argument("--url", default=DEFAULT_GRPC_URL, help="Triton gRPC address")
    group.add_argument("--start-server", action="store_true",
                       help="start a local Triton (CPU configs) on free ports for the run instead of using --url")
    group.add_argument("--model-repository", type=Path, default=MODELS_ROOT,
                       help="model repository whose configs state the contract (and that --start-server serves)")


def add_scan_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("whole-board scans")
    group.add_argument("--tile", action="store_true",
                       help="send each image to the scan model, which cuts it into overlapping tiles at native "
                            "resolution on the server (whole-board scans), instead of letting the pipeline "
                            "shrink it to the detector input")
    group.add_argument("--shared-memory", action="store_true",
                       help="pass the encoded images through system shared memory (client on the server's host)")


def add_misregistration_arguments(parser, default_shift: float = 0.0, default_angle: float = 0.0) -> None:
    """--misregister-shift, --misregister-angle, --misregister-seed: templates moved by a random known drift
    (tools.data.misregistration.Misregistration.random), as line-scan crops drift."""
    parser.add_argument("--misregister-shift", type=float, default=default_shift, metavar="PX",
                        help="move each template by up to this many pixels along each axis (uniform, seeded)")
    parser.add_argument("--misregister-angle", type=float, default=default_angle, metavar="DEG",
                        help="and turn it by up to this many degrees about its centre")
    parser.add_argument("--misregister-seed", type=int, default=0, help="seed of the drifts")
