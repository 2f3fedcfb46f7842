"""Detect PCB defects in images with the served pipeline.

    python -m tools.client IMAGE_OR_DIR [...] [--url localhost:8001 | --start-server] [--json out.json]
        [--annotate-dir DIR] [--score-threshold S] [--iou-threshold T] [--concurrency N] [--recursive]
        [--tile] [--shared-memory]

With TRACEPARENT set (a W3C traceparent, e.g. from a traced parent process), the requests continue that trace
into a server that traces with OpenTelemetry.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tools.arguments import add_scan_arguments, add_server_arguments
from tools.client.pipeline_client import InferenceFailed, PipelineClient
from tools.client.results import detections_table, find_images, write_annotated, write_json
from tools.client.tracing import environment_context
from tools.contract import read_labels, served_contract
from tools.serve.triton_server import serving


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR")
    parser.add_argument("--json", type=Path, help="write detections per file to this JSON file")
    parser.add_argument("--annotate-dir", type=Path, help="write annotated images to this folder")
    parser.add_argument("--score-threshold", type=float, help="default: the served one")
    parser.add_argument("--iou-threshold", type=float, help="default: the served one")
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight at once")
    parser.add_argument("--recursive", action="store_true", help="look for images in subfolders too")
    parser.add_argument("--labels", type=Path, help="class names, one per line (default: the served labels.txt)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    add_server_arguments(parser)
    add_scan_arguments(parser)
    args = parser.parse_args(argv)

    paths = find_images(args.inputs, recursive=args.recursive)
    if not paths:
        parser.error("no images found")
    contract = served_contract(models_root=args.model_repository)
    labels = read_labels(args.labels) if args.labels else contract.labels
    failures: dict[str, str] = {}
    with serving(args.url, args.start_server, args.model_repository) as url, environment_context(), \
            PipelineClient(url, timeout_s=args.timeout, contract=contract) as client:
        try:
            results = client.infer_files(paths, args.score_threshold, args.iou_threshold, args.concurrency,
                                         scans=args.tile, shared_memory=args.shared_memory)
        except InferenceFailed as error:
            results, failures = error.results, error.failures

    print(detections_table(paths, results, labels, failures))
    if args.json:
        write_json(args.json, paths, results, labels, failures)
        print(f"Detections written to {args.json}")
    if args.annotate_dir:
        written = write_annotated(paths, results, labels, args.annotate_dir)
        print(f"{len(written)} annotated images written to {args.annotate_dir}")
    if failures:
        print(f"{len(failures)} of {len(paths)} images failed (see table above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
