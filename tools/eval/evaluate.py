"""Accuracy of the LIVE served pipeline on a DeepPCB-format folder.

    python -m tools.eval --data DIR --list test.txt --url localhost:8001 --out reports/eval
    python -m tools.eval --list trainval.txt --split val --start-server --detector validation/heldout_groups

Every board goes through the served pipeline over gRPC (the path users call) with a low score threshold, so
the whole ranking is there for AP; the F-score is taken at each board's deployed threshold (the postprocess
config's ``template_score_threshold`` where the board's template registered, its ``score_threshold``
otherwise; read through tools.contract) by keeping the detections scoring above it, as the postprocess step
does. ``--split val`` evaluates the validation part of the split the detector was trained with
(tools.data.splits; a different split of the same list is refused, as is a detector trained on all of it, the
shipped one). ``--detector DIR`` serves DIR's detector files in a temporary copy of the repository instead:
``validation/heldout_groups``, the recipe trained with the default groups held out, is what the validation
figures are of. Metrics are those of ``tools.eval.metrics`` (DeepPCB rule: IoU > 0.33 with a same-class
defect, uninterpolated pooled AP; and VOC mAP@0.5). Writes ``report.md``, ``report.json``,
``precision_recall.png`` and annotated examples of misses and false alarms under ``--out``
(tools.eval.report).

Golden-template inspection: ``--with-templates`` sends each board's defect-free template (``X_temp.jpg``) with
it, and the report adds the registration scores. ``--misregister-shift PX --misregister-angle DEG`` sends the
templates moved by a random known drift instead (``Misregistration.random``, seeded by
``--misregister-seed``, encoded as PNG in memory), and reports the registration error against the drift
(``expected_registration``; DeepPCB templates themselves sit up to a few pixels off their images, so the error
includes that offset). A board whose template the server refuses is inspected without it and listed.

    python -m tools.eval --list test.txt --with-templates --start-server
    python -m tools.eval --list test.txt --with-templates --misregister-shift 30 --misregister-angle 1 --start-server
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from tools.arguments import (
    add_data_arguments,
    add_misregistration_arguments,
    add_scan_arguments,
    add_server_arguments,
    validation_split,
)
from tools.client.pipeline_client import InferenceFailed, PipelineClient
from tools.contract import REPO_ROOT, ServedContract, served_contract
from tools.data.deeppcb import Sample, read_grey
from tools.data.misregistration import Misregistration
from tools.data.splits import HELD_OUT_GROUPS_DETECTOR, check_model_split, select_samples
from tools.detections import Detections
from tools.eval.report import EvaluationSetup, registration_summary, write_report
from tools.pipeline_math import registration, scan_windows, tiling
from tools.serve.repository_copy import repository_with_detector
from tools.serve.triton_server import serving

LOW_SCORE_THRESHOLD = 0.001


def misregistered_templates(samples: Sequence[Sample], shift: float, angle: float, seed: int, fill: float):
    """Each board's template moved by a random drift: (encoded PNG bytes, the drift, the template's size)."""
    rng = np.random.default_rng(seed)
    moved = []
    for sample in samples:
        template = read_grey(sample.template_path)
        drift = Misregistration.random(rng, shift, angle)
        ok, encoded = cv2.imencode(".png", drift.apply(template, fill))
        if not ok:
            raise OSError(f"cannot encode the misregistered template of {sample.image_path}")
        moved.append((encoded.tobytes(), drift, template.shape[1], template.shape[0]))
    return moved


def tile_windows(width: int, height: int, contract: ServedContract, scans: bool):
    """The windows the served model registers a template in: the whole board, or the scan model's tiles."""
    return scan_windows(height, width, contract) if scans else [tiling.Window(0, 0, width, height)]


def expected_registrations(drift: Misregistration, width: int, height: int, windows) -> np.ndarray:
    """(tiles, 3) dx, dy, angle that registering each window of the moved template should report, in that
    window's pixels (for one window covering the board: ``drift.expected_registration``)."""
    moved_to_board = cv2.invertAffineTransform(
        registration.rotation_about_centre(width, height, drift.dx, drift.dy, drift.angle))
    rows = []
    for w in windows:  # in window pixels q: q -> A (q + origin) - origin
        local = moved_to_board.copy()
        local[:, 2] += local[:, :2] @ np.array([w.x0, w.y0], np.float64) - (w.x0, w.y0)
        rows.append(registration.describe_transform(local, w.x1 - w.x0, w.y1 - w.y0))
    return np.array(rows, np.float64).reshape(-1, 3)


def inspect_with_fallback(client: PipelineClient, samples: Sequence[Sample], templates, **request):
    """Inspect every board with its template; a board whose template the server refuses (an error naming
    TEMPLATE) is inspected again without one. Returns (detections, {image: why its template was refused});
    any other failure raises InferenceFailed as without templates."""
    paths = [s.image_path for s in samples]
    try:
        return client.infer_files(paths, templates=templates, **request), {}
    except InferenceFailed as error:
        refused = {name: why for name, why in error.failures.items() if "TEMPLATE" in why}
        if len(refused) < len(error.failures):
            raise
        results: list[Detections] = list(error.results)
        again = [i for i, p in enumerate(paths) if str(p) in refused]
        for index, detections in zip(again, client.infer_files([paths[i] for i in again], **request)):
            results[index] = detections
        return results, refused


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_arguments(parser, default_list="test.txt", default_part="all")
    parser.add_argument("--limit", type=int, help="evaluate only the first N boards (quick checks)")
    add_server_arguments(parser)
    parser.add_argument("--request-score-threshold", type=float, default=LOW_SCORE_THRESHOLD,
                        help="score_threshold sent with each request; low so AP sees the whole ranking")
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight")
    parser.add_argument("--examples", type=int, default=6, help="annotated boards to write")
    parser.add_argument("--out", type=Path, default=Path("reports/eval"))
    add_scan_arguments(parser)
    group = parser.add_argument_group("golden-template inspection")
    group.add_argument("--with-templates", action="store_true",
                       help="send each board's defect-free template (X_temp) with it; the server registers it")
    add_misregistration_arguments(group)
    parser.add_argument("--detector", type=Path, metavar="DIR",
                        help="with --start-server: serve a temporary copy of --model-repository whose detector is "
                             "the ONNX files of DIR instead, e.g. the recipe's held-out-groups detector, "
                             f"{HELD_OUT_GROUPS_DETECTOR.relative_to(REPO_ROOT)}, that the validation figures are of")
    args = parser.parse_args(argv)
    if args.detector and not args.start_server:
        parser.error("--detector swaps the detector of the server it starts: add --start-server")
    with repository_with_detector(args.model_repository, args.detector) as repository:
        return evaluate(parser, args, repository)


def evaluate(parser: argparse.ArgumentParser, args: argparse.Namespace, repository: Path) -> dict:
    """The evaluation ``main`` asked for, of the pipeline ``repository`` serves."""
    split = validation_split(args)
    contract = served_contract(models_root=repository)
    misregister = bool(args.misregister_shift or args.misregister_angle)
    if misregister and not args.with_templates:
        parser.error("--misregister-shift/--misregister-angle move the templates: add --with-templates")

    if args.split != "all":
        try:
            check_model_split(contract.detector_onnx, split, args.data / args.list)
        except ValueError as wrong_boards:
            parser.error(str(wrong_boards))
    samples = select_samples(args.data, args.list, args.split, split)[: args.limit]
    if not samples:
        raise SystemExit(f"no boards selected from {args.data / args.list} (split {args.split})")
    templates, expected, refused = None, None, {}
    if args.with_templates:
        missing = [str(s.template_path) for s in samples if not s.template_path.is_file()]
        if missing:
            raise SystemExit(f"{len(missing)} boards have no template, e.g. {missing[0]}")
        templates = [s.template_path for s in samples]
        if misregister:
            moved = misregistered_templates(samples, args.misregister_shift, args.misregister_angle,
                                            args.misregister_seed, contract.pad_value)
            templates = [encoded for encoded, *_ in moved]
            expected = [expected_registrations(drift, w, h, tile_windows(w, h, contract, args.tile))
                        for _, drift, w, h in moved]
    request = dict(score_threshold=args.request_score_threshold, concurrency=args.concurrency, scans=args.tile,
                   shared_memory=args.shared_memory)
    with serving(args.url, args.start_server, repository) as url:
        with PipelineClient(url=url, contract=contract) as client:
            if templates is None:
                detections = client.infer_files([s.image_path for s in samples], **request)
            else:
                detections, refused = inspect_with_fallback(client, samples, templates, **request)
    setup = EvaluationSetup(
        data=str(args.data),
        list=args.list,
        split=args.split,
        val_fraction=split.fraction,
        split_seed=split.seed,
        val_groups=split.groups,
        url=url,
        model=contract.scan_model if args.tile else contract.pipeline_model,
        request_score_threshold=args.request_score_threshold,
        deployed_score_threshold=contract.score_threshold,
        deployed_template_score_threshold=contract.template_score_threshold,
        config=str(args.model_repository / contract.postprocess_model),
        detector=str(args.detector or contract.detector_version_dir),
        templates=("misregistered" if misregister else "as given") if args.with_templates else "none",
        misregister_shift=args.misregister_shift,
        misregister_angle=args.misregister_angle,
        misregister_seed=args.misregister_seed,
    )
    summary = registration_summary(samples, detections, expected, refused) if args.with_templates else None
    deployed = [contract.deployed_score_threshold(d.registration) for d in detections]
    report = write_report(samples, detections, setup, contract.labels, args.out, args.examples, summary, deployed)
    m = report["metrics"]
    print(
        f"{m['images']} boards, {m['ground_truths']} defects: DeepPCB AP {100 * m['deeppcb']['ap']:.2f} %, "
        f"F-score {100 * m['deeppcb']['at_threshold']['f_score']:.2f} % at score "
        f"{' / '.join(f'{t:g}' for t in sorted(set(deployed)))}, "
        f"mAP@0.5 {100 * m['voc']['map50']:.2f} %. Report: {args.out / 'report.md'}"
    )
    if summary is not None:
        print(registration_line(summary))
    return report


def registration_line(summary: dict) -> str:
    score, line = summary["score"], f"Templates ({summary['templates']}): {summary['registered']} registered"
    if score is not None:
        line += f", score {score['min']:.3f} to {score['max']:.3f} (mean {score['mean']:.3f})"
    if summary.get("error"):
        shift, angle = summary["error"]["shift_px"], summary["error"]["angle_deg"]
        line += (f"; error against the known drift: shift mean {shift['mean']:.2f} px, max {shift['max']:.2f} px, "
                 f"angle mean {angle['mean']:.3f} deg, max {angle['max']:.3f} deg")
    if summary["refused"]:
        line += f"; {len(summary['refused'])} refused (inspected without)"
    return line + "."
