"""Detect PCB defects in images with the served pipeline.

    python -m tools.client IMAGE_OR_DIR [...] [--url localhost:8001 | --start-server] [--json out.json]
        [--annotate-dir DIR] [--score-threshold S] [--iou-threshold T] [--concurrency N] [--recursive]
        [--tile] [--shared-memory] [--template FILE | --templates DIR]

Golden-template inspection: ``--template FILE`` sends FILE as the defect-free template of the one input image;
``--templates DIR`` finds each image's template in DIR by DeepPCB naming (``X_test.jpg`` -> ``X_temp.jpg``) or
under the image's own file name. An image without a template found is inspected without one (the table's
``template`` column says ``none``). With ``--tile`` the scan model cuts the template into the scan's tiles. The
JSON records each registration (dx, dy, angle, score; per tile for scans); ``--annotate-dir`` draws an image
inspected with a template beside its template, registered as the server registered it (as sent, for a scan).

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
from tools.data.deeppcb import template_path_for
from tools.serve.triton_server import serving


def find_templates(paths: list[Path], template: Path | None,
                   templates_dir: Path | None) -> tuple[list[Path], list[Path | None] | None]:
    """(the images to inspect, each one's template or None) from --template or --templates; templates None when
    neither was given. Templates found among the images (a DeepPCB folder holds both) are not inspected."""
    if template is not None:
        return paths, [template]
    if templates_dir is None:
        return paths, None
    found = {path.resolve(): template_path_for(path, templates_dir) for path in paths}
    references = {t.resolve() for t in found.values() if t is not None}
    boards = [path for path in paths if path.resolve() not in references]
    return boards, [found[path.resolve()] for path in boards]


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
    group = parser.add_argument_group("golden-template inspection").add_mutually_exclusive_group()
    group.add_argument("--template", type=Path, metavar="FILE", help="the defect-free template of the one input image")
    group.add_argument("--templates", type=Path, metavar="DIR",
                       help="folder of templates: X_temp.jpg for X_test.jpg (DeepPCB naming), or the image's own "
                            "file name; images without one are inspected without a template")
    add_server_arguments(parser)
    add_scan_arguments(parser)
    args = parser.parse_args(argv)

    paths = find_images(args.inputs, recursive=args.recursive)
    if not paths:
        parser.error("no images found")
    if args.template is not None and len(paths) != 1:
        parser.error(f"--template goes with one image, got {len(paths)}: use --templates DIR for several")
    if args.template is not None and not args.template.is_file():
        parser.error(f"no such template file: {args.template}")
    if args.templates is not None and not args.templates.is_dir():
        parser.error(f"no such templates folder: {args.templates}")
    paths, templates = find_templates(paths, args.template, args.templates)
    contract = served_contract(models_root=args.model_repository)
    labels = read_labels(args.labels) if args.labels else contract.labels
    failures: dict[str, str] = {}
    with serving(args.url, args.start_server, args.model_repository) as url, environment_context(), \
            PipelineClient(url, timeout_s=args.timeout, contract=contract) as client:
        try:
            results = client.infer_files(paths, args.score_threshold, args.iou_threshold, args.concurrency,
                                         scans=args.tile, shared_memory=args.shared_memory, templates=templates)
        except InferenceFailed as error:
            results, failures = error.results, error.failures

    print(detections_table(paths, results, labels, failures, templates=templates is not None))
    if templates is not None:
        missing = sum(t is None for t in templates)
        print(f"{len(paths) - missing} of {len(paths)} images inspected with a template"
              + (f"; no template found for {missing} in {args.templates}" if missing else ""))
    if args.json:
        write_json(args.json, paths, results, labels, failures, templates)
        print(f"Detections written to {args.json}")
    if args.annotate_dir:
        written = write_annotated(paths, results, labels, args.annotate_dir, templates, contract.pad_value)
        print(f"{len(written)} annotated images written to {args.annotate_dir}")
    if failures:
        print(f"{len(failures)} of {len(paths)} images failed (see table above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
