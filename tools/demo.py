"""End-to-end demo: serve the models on CPU, find defects on sample boards, show and save the results.

    python -m tools.demo [--images FOLDER] [--out out/demo] [--count 6] [--seed 0]

Without ``--images`` it draws labelled synthetic boards with tools.data.synth_boards, and one whole-board scan
that the pcb_scan model tiles on the server. It prints a table of the
defects found per image and writes ``detections.json`` and annotated pictures (``annotated/``) to ``--out``.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from tools.client.pipeline_client import InferenceFailed, PipelineClient
from tools.client.results import detections_table, find_images, write_annotated, write_json
from tools.contract import REPO_ROOT, served_contract
from tools.data.deeppcb import Sample, read_split
from tools.eval.metrics import VOC_IOU_THRESHOLD, match_image
from tools.serve.triton_server import TritonServer

BOARD_LIST_FILE = "test.txt"
SCAN_WIDTH, SCAN_HEIGHT = 2560, 1920  # a whole-board scan: 4 x 3 detector inputs


def synthetic_boards(out: Path, count: int, seed: int, *size_flags: str) -> list[Sample]:
    subprocess.run([sys.executable, "-m", "tools.data.synth_boards", "--out", str(out), "--count", str(count),
                    "--seed", str(seed), "--list-file", BOARD_LIST_FILE, *size_flags], cwd=REPO_ROOT, check=True)
    return read_split(out, BOARD_LIST_FILE)


def labelled_defects_found(samples: list[Sample], results: list) -> tuple[int, int]:
    """(labelled defects found, labelled defects): PASCAL VOC pairing, same class, IoU above 0.5."""
    found = labelled = 0
    for sample, detections in zip(samples, results):
        if detections is not None:
            found += int(match_image(sample, detections, "voc", VOC_IOU_THRESHOLD)[1].sum())
            labelled += len(sample.boxes)
    return found, labelled


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=Path, help="folder of your own board images (default: synthetic boards)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "out" / "demo")
    parser.add_argument("--count", type=int, default=6, help="synthetic boards to generate")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic boards")
    parser.add_argument("--score-threshold", type=float, help="override the deployed score threshold")
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight at once")
    args = parser.parse_args(argv)

    args.out.mkdir(parents=True, exist_ok=True)
    if args.images:
        samples = None
        paths = find_images([args.images])
        if not paths:
            parser.error(f"no JPEG, PNG, BMP or TIFF images in {args.images}")
        scans = []
    else:
        print(f"Generating {args.count} synthetic boards with labelled defects, and one whole-board scan...", flush=True)
        samples = synthetic_boards(args.out / "boards", args.count, args.seed)
        scans = synthetic_boards(args.out / "scan", 1, args.seed, "--size", str(SCAN_WIDTH), "--height",
                                 str(SCAN_HEIGHT), "--format", "png")
        paths = [sample.image_path for sample in samples]

    contract = served_contract()
    labels = contract.labels
    failures: dict[str, str] = {}
    print("Starting the Triton server (CPU configs)...", flush=True)
    with TritonServer.on_free_ports() as server:
        print(f"Server ready (gRPC {server.grpc_url}); sending {len(paths)} images through {contract.pipeline_model}", flush=True)
        with PipelineClient(server.grpc_url) as client:
            try:
                results = client.infer_files(paths, score_threshold=args.score_threshold,
                                             concurrency=args.concurrency)
            except InferenceFailed as error:
                results, failures = error.results, error.failures
            if scans:
                print(f"Sending a {SCAN_WIDTH}x{SCAN_HEIGHT} scan through {contract.scan_model} (tiled on the server)",
                      flush=True)
                try:
                    results += client.infer_files([scan.image_path for scan in scans], args.score_threshold,
                                                  progress=False, scans=True)
                except InferenceFailed as error:
                    results, failures = results + error.results, failures | error.failures
                paths += [scan.image_path for scan in scans]
                samples += scans
    print("Server stopped.\n")

    print("Defects found per image:")
    print(detections_table(paths, results, labels, failures))
    found_total = sum(len(r.classes) for r in results if r is not None)
    print(f"\n{found_total} defects found in {len(paths) - len(failures)} images.")
    if samples is not None:
        found, labelled = labelled_defects_found(samples, results)
        print(f"The boards carry {labelled} labelled defects; {found} of them were found "
              f"(same class, IoU > {VOC_IOU_THRESHOLD}).")

    json_path = args.out / "detections.json"
    write_json(json_path, paths, results, labels, failures)
    annotated = write_annotated(paths, results, labels, args.out / "annotated")
    print(f"Detections: {json_path}\nAnnotated images ({len(annotated)}): {args.out / 'annotated'}")
    if failures:
        print(f"{len(failures)} images could not be processed (see the table).", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
