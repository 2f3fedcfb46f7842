"""End-to-end demo: serve the models on CPU, find defects on sample boards, show and save the results.

    python -m tools.demo [--images FOLDER] [--out out/demo] [--count 6] [--seed 0]

Without ``--images`` it draws labelled synthetic boards with tools.data.synth_boards, and one whole-board scan
that the pcb_scan model tiles on the server. It prints a table of the
defects found per image and writes ``detections.json`` and annotated pictures (``annotated/``) to ``--out``.
Then it inspects the same boards again with their defect-free templates (golden-template inspection; with
``--images``, templates found beside them by DeepPCB naming, ``X_test.jpg`` -> ``X_temp.jpg``), prints what each
mode finds and the registrations, and writes ``detections_with_templates.json`` and side-by-side pictures (the
board with its defects | its template registered onto it) to ``with_templates/``.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from tools.client.pipeline_client import InferenceFailed, PipelineClient
from tools.client.results import detections_table, find_images, registration_cell, write_annotated, write_json
from tools.contract import REPO_ROOT, served_contract
from tools.data.deeppcb import Sample, read_split, template_path_for
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


def inspect(client: PipelineClient, paths: list[Path], scan_count: int, score_threshold: float | None,
            concurrency: int, templates: list[Path | None] | None = None):
    """The boards through pcb_pipeline and the last ``scan_count`` paths (scans) through pcb_scan, with their
    templates when given. Returns (results, failures)."""
    boards, scans = paths[: len(paths) - scan_count], paths[len(paths) - scan_count :]
    templates = [None] * len(paths) if templates is None else templates
    results, failures = [], {}
    for part, part_templates, is_scan in ((boards, templates[: len(boards)], False),
                                          (scans, templates[len(boards) :], True)):
        if not part:
            continue
        try:
            results += client.infer_files(part, score_threshold, concurrency=concurrency, progress=not is_scan,
                                          scans=is_scan, templates=part_templates)
        except InferenceFailed as error:
            results, failures = results + error.results, failures | error.failures
    return results, failures


def compare_modes(paths: list[Path], without: list, with_templates: list, labels, samples) -> str:
    """What each mode finds, image by image: defects without and with the template, and the registration."""
    rows = [f"{'image':<28} {'without':>8} {'with':>6}  registration (dx, dy px, angle deg, score)"]
    for path, alone, paired in zip(paths, without, with_templates):
        if alone is None or paired is None:
            rows.append(f"{path.name:<28} {'-' if alone is None else len(alone):>8} "
                        f"{'-' if paired is None else len(paired):>6}  failed")
            continue
        registration = paired.registration
        if registration is None:
            where = "no template"
        elif registration.ndim == 1:
            dx, dy, angle, score = registration.tolist()
            where = f"{dx:+.1f}, {dy:+.1f}, {angle:+.2f}, {score:.3f}"
        else:
            where = f"{len(registration)} tiles, score {registration_cell(paired)}"
        rows.append(f"{path.name:<28} {len(alone):>8} {len(paired):>6}  {where}")
    if samples is not None:
        for name, results in (("without templates", without), ("with templates", with_templates)):
            found, labelled = labelled_defects_found(samples, results)
            rows.append(f"Labelled defects found {name}: {found} of {labelled}")
    return "\n".join(rows)


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
        print(f"Server ready (gRPC {server.grpc_url}); sending {len(paths)} images through {contract.pipeline_model}"
              + (f", and a {SCAN_WIDTH}x{SCAN_HEIGHT} scan through {contract.scan_model} (tiled on the server)"
                 if scans else ""), flush=True)
        paths += [scan.image_path for scan in scans]
        if samples is not None:
            samples += scans
        templates = [template_path_for(path) for path in paths]
        with PipelineClient(server.grpc_url) as client:
            results, failures = inspect(client, paths, len(scans), args.score_threshold, args.concurrency)
            if any(templates):
                print(f"Inspecting them again with their templates ({sum(t is not None for t in templates)} "
                      "found), registered on the server", flush=True)
                paired, paired_failures = inspect(client, paths, len(scans), args.score_threshold,
                                                  args.concurrency, templates)
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
    if any(templates):
        print("\nGolden-template inspection: defects found per image without and with its template")
        print(compare_modes(paths, results, paired, labels, samples))
        paired_json = args.out / "detections_with_templates.json"
        write_json(paired_json, paths, paired, labels, paired_failures, templates)
        pictures = write_annotated(paths, paired, labels, args.out / "with_templates", templates, contract.pad_value)
        print(f"Detections with templates: {paired_json}\nSide-by-side pictures ({len(pictures)}, the board | its "
              f"template registered onto it; the scan's as sent): {args.out / 'with_templates'}")
        failures = failures | {f"{name} (with its template)": why for name, why in paired_failures.items()}
    if failures:
        print(f"{len(failures)} images could not be processed (see the table).", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
