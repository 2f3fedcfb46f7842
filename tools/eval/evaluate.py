"""Accuracy of the LIVE served pipeline on a DeepPCB-format folder.

    python -m tools.eval --data DIR --list test.txt --url localhost:8001 --out reports/eval
    python -m tools.eval --list trainval.txt --split val --start-server

Every board goes through the served pipeline over gRPC (the path users call) with a low score threshold, so
the whole ranking is there for AP; the F-score is taken at the deployed threshold (the postprocess config's
``score_threshold``, read through tools.contract) by keeping the detections scoring above it, as the
postprocess step does. ``--split val`` evaluates the validation part of the split the detector was trained
with (tools.data.splits; a different split of the same list is refused). Metrics are those of
``tools.eval.metrics`` (DeepPCB rule: IoU > 0.33 with a same-class defect, uninterpolated pooled AP; and VOC
mAP@0.5). Writes ``report.md``, ``report.json``, ``precision_recall.png`` and annotated examples of misses
and false alarms under ``--out`` (tools.eval.report).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from tools.arguments import add_data_arguments, add_scan_arguments, add_server_arguments, validation_split
from tools.client.pipeline_client import PipelineClient
from tools.contract import served_contract
from tools.data.splits import check_model_split, select_samples
from tools.eval.report import EvaluationSetup, write_report
from tools.serve.triton_server import serving

LOW_SCORE_THRESHOLD = 0.001


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
    args = parser.parse_args(argv)
    split = validation_split(args)
    contract = served_contract(models_root=args.model_repository)

    if args.split != "all":
        check_model_split(contract.detector_onnx, split, args.data / args.list)
    samples = select_samples(args.data, args.list, args.split, split)[: args.limit]
    if not samples:
        raise SystemExit(f"no boards selected from {args.data / args.list} (split {args.split})")
    with serving(args.url, args.start_server, args.model_repository) as url:
        with PipelineClient(url=url, contract=contract) as client:
            detections = client.infer_files(
                [s.image_path for s in samples],
                score_threshold=args.request_score_threshold,
                concurrency=args.concurrency,
                scans=args.tile,
                shared_memory=args.shared_memory,
            )
    setup = EvaluationSetup(
        data=str(args.data),
        list=args.list,
        split=args.split,
        val_fraction=split.fraction,
        split_seed=split.seed,
        url=url,
        model=contract.scan_model if args.tile else contract.pipeline_model,
        request_score_threshold=args.request_score_threshold,
        deployed_score_threshold=contract.score_threshold,
        config=str(contract.models_root / contract.postprocess_model),
    )
    report = write_report(samples, detections, setup, contract.labels, args.out, args.examples)
    m = report["metrics"]
    print(
        f"{m['images']} boards, {m['ground_truths']} defects: DeepPCB AP {100 * m['deeppcb']['ap']:.2f} %, "
        f"F-score {100 * m['deeppcb']['at_threshold']['f_score']:.2f} % at score {contract.score_threshold:g}, "
        f"mAP@0.5 {100 * m['voc']['map50']:.2f} %. Report: {args.out / 'report.md'}"
    )
    return report
