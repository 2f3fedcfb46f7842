"""Accuracy of the LIVE served pipeline on a DeepPCB-format folder.

    python -m tools.evaluate --data DIR --list test.txt --url localhost:8001 --out reports/eval
    python -m tools.evaluate --list trainval.txt --split val --seed 0 --val-fraction 0.15 --start-server

Every board goes through ``pcb_pipeline`` over gRPC (the path users call) with a low score threshold, so
the whole ranking is there for AP; the F-score is taken at the deployed threshold, the ``score_threshold``
parameter of ``models/postprocess/config.pbtxt``, by keeping the detections scoring above it as the
postprocess step does.
``--split val`` evaluates exactly the validation part that ``tools.deeppcb.split_train_val`` carves for
training. Metrics are those of ``tools.metrics`` (DeepPCB rule: IoU > 0.33 with a same-class defect,
uninterpolated pooled AP; and VOC mAP@0.5). Writes ``report.md``, ``report.json``,
``precision_recall.png`` and annotated examples of misses and false alarms under ``--out``.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import itertools
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(2**40))  # must precede the cv2 import to take effect
import cv2  # noqa: E402

from tools.deeppcb import DEFAULT_ROOT, Sample, select_samples  # noqa: E402
from tools.metrics import (  # noqa: E402
    DEEPPCB_IOU_THRESHOLD,
    VOC_IOU_THRESHOLD,
    above_threshold,
    match_in_file_order,
    precision_recall_curve,
    rank_detections,
    summarize,
)

REPO = Path(__file__).resolve().parent.parent
MODEL_REPOSITORY = REPO / "models"
LOW_SCORE_THRESHOLD = 0.001
TRUTH_COLOUR = (0, 255, 255)  # BGR yellow: not in tools.annotate's class palette
OUTLINE_COLOUR = (0, 0, 0)


def deployed_score_threshold(config_path: Path = MODEL_REPOSITORY / "postprocess" / "config.pbtxt") -> float:
    """The postprocess model's default ``score_threshold`` parameter, read with protobuf."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    config = text_format.Parse(Path(config_path).read_text(), model_config_pb2.ModelConfig())
    if "score_threshold" not in config.parameters:
        raise KeyError(f"{config_path}: no 'score_threshold' parameter")
    return float(config.parameters["score_threshold"].string_value)


@dataclass(frozen=True)
class EvaluationSetup:
    """What was evaluated and how; goes into the report as is."""

    data: str
    list: str
    split: str
    val_fraction: float
    seed: int
    url: str
    model: str
    request_score_threshold: float  # sent with every request, low so AP sees the whole ranking
    deployed_score_threshold: float  # the postprocess default, where the F-score is taken
    config: str  # where the deployed threshold was read
    tiles: dict | None = None  # tile size, overlap and merge IoU when scans were tiled (tools.tiling)


@dataclass(frozen=True)
class ScoredDetections:
    """Detections of one board in descending score order: the DeepPCB "file order" of a results file."""

    boxes: np.ndarray
    scores: np.ndarray
    classes: np.ndarray

    @classmethod
    def ranked(cls, detections) -> "ScoredDetections":
        order = np.argsort(-np.asarray(detections.scores), kind="stable")
        return cls(
            np.asarray(detections.boxes)[order],
            np.asarray(detections.scores)[order],
            np.asarray(detections.classes)[order],
        )

    def above(self, score_threshold: float) -> "ScoredDetections":
        """What the pipeline keeps at ``score_threshold``: postprocess keeps scores strictly above it."""
        keep = above_threshold(self.scores, score_threshold)
        return ScoredDetections(self.boxes[keep], self.scores[keep], self.classes[keep])


@dataclass(frozen=True)
class ImageOutcome:
    """What went wrong on one board at the deployed threshold."""

    index: int
    missed: np.ndarray  # (n_gt,) bool
    false_alarm: np.ndarray  # (n_det,) bool, over the detections kept at the threshold


def image_outcomes(samples: Sequence[Sample], kept: Sequence[ScoredDetections]) -> list[ImageOutcome]:
    outcomes = []
    for index, (sample, detections) in enumerate(zip(samples, kept, strict=True)):
        det_tp, gt_found = match_in_file_order(sample.boxes, sample.classes, detections.boxes, detections.classes)
        outcomes.append(ImageOutcome(index, ~gt_found, ~det_tp))
    return outcomes


def pick_examples(outcomes: Sequence[ImageOutcome], count: int) -> list[ImageOutcome]:
    """The boards with most misses and the boards with most false alarms, alternating, no repeats."""
    by_misses = sorted((o for o in outcomes if o.missed.any()), key=lambda o: -o.missed.sum())
    by_alarms = sorted((o for o in outcomes if o.false_alarm.any()), key=lambda o: -o.false_alarm.sum())
    picked: dict[int, ImageOutcome] = {}
    for pair in itertools.zip_longest(by_misses, by_alarms):
        for outcome in pair:
            if outcome is not None and len(picked) < count:
                picked.setdefault(outcome.index, outcome)
    return list(picked.values())


def draw_corner_marks(image: np.ndarray, corners: tuple[int, int, int, int], thickness: int) -> None:
    """Yellow corner brackets with a black outline: a ground-truth style unlike tools.annotate's class-coloured
    full boxes, and visible on black copper and white substrate alike."""
    x1, y1, x2, y2 = corners
    arm = max(4, min(x2 - x1, y2 - y1) // 3)
    for colour, width in ((OUTLINE_COLOUR, thickness + 2), (TRUTH_COLOUR, thickness)):
        for x, y, dx, dy in ((x1, y1, 1, 1), (x2, y1, -1, 1), (x1, y2, 1, -1), (x2, y2, -1, -1)):
            cv2.line(image, (x, y), (x + dx * arm, y), colour, width)
            cv2.line(image, (x, y), (x, y + dy * arm), colour, width)


def draw_example(
    sample: Sample, detections: ScoredDetections, outcome: ImageOutcome, class_names: Sequence[str]
) -> np.ndarray:
    """The board with its ground truth as corner brackets (thick and labelled MISSED where the pipeline missed
    the defect) under the pipeline's detections at the deployed threshold (drawn by tools.annotate)."""
    from tools.annotate import draw_detections

    image = cv2.imread(str(sample.image_path), cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError(f"{sample.image_path}: not a readable image")
    for box, class_id, missed in zip(sample.boxes, sample.classes, outcome.missed, strict=True):
        x1, y1, x2, y2 = (int(v) for v in box)
        thickness, pad = (3, 4) if missed else (1, 2)
        draw_corner_marks(image, (x1 - pad, y1 - pad, x2 + pad, y2 + pad), thickness)
        if missed:
            origin, font, text = (x1 - pad, y2 + pad + 14), cv2.FONT_HERSHEY_SIMPLEX, f"MISSED {class_names[class_id]}"
            cv2.putText(image, text, origin, font, 0.45, OUTLINE_COLOUR, 3, cv2.LINE_AA)
            cv2.putText(image, text, origin, font, 0.45, TRUTH_COLOUR, 1, cv2.LINE_AA)
    return draw_detections(image, detections, class_names)


def plot_precision_recall(
    ground_truths, predictions, score_threshold: float, class_names: Sequence[str], path: Path
) -> None:
    """PR curves per class and overall, under both rules, with the deployed operating point marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(13, 5.5), sharey=True)
    rules = (
        ("file_order", DEEPPCB_IOU_THRESHOLD, "DeepPCB rule (IoU > 0.33)"),
        ("voc", VOC_IOU_THRESHOLD, "VOC rule (IoU > 0.5)"),
    )
    for axis, (rule, iou, title) in zip(axes, rules, strict=True):
        ranked = rank_detections(ground_truths, predictions, rule, iou, len(class_names))
        for class_id, name in enumerate(class_names):
            if not ranked.gt_per_class[class_id]:
                continue  # no defects of this class: no curve to draw
            precision, recall, _ = precision_recall_curve(ranked, class_id)
            axis.plot(
                recall,
                precision,
                linewidth=1,
                marker="." if len(recall) < 20 else None,
                label=f"{name} ({ranked.gt_per_class[class_id]} defects)",
            )
        precision, recall, scores = precision_recall_curve(ranked)
        axis.plot(recall, precision, color="black", linewidth=2.2, label="all classes")
        kept = np.flatnonzero(above_threshold(scores, score_threshold))
        if len(kept):
            axis.plot(
                recall[kept[-1]],
                precision[kept[-1]],
                "o",
                color="red",
                markersize=8,
                label=f"score > {score_threshold:g}",
            )
        axis.set(title=title, xlabel="recall", xlim=(0, 1.01), ylim=(0, 1.01))
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("precision")
    axes[1].legend(loc="lower left", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f} %"


def count_names(names: Sequence[str]) -> str:
    """'open x2, spur' style summary of a list of class names, or '-' when empty."""
    counts = collections.Counter(names)
    return ", ".join(f"{name} x{n}" if n > 1 else name for name, n in counts.most_common()) or "-"


def markdown_report(report: dict, examples: list[dict]) -> str:
    summary, setup = report["metrics"], report["setup"]
    deeppcb, at = summary["deeppcb"], summary["deeppcb"]["at_threshold"]
    lines = [
        "# Accuracy of the served pipeline",
        "",
        f"Data: `{setup['data']}` list `{setup['list']}`, split `{setup['split']}`"
        + (f" (val fraction {setup['val_fraction']}, seed {setup['seed']})" if setup["split"] != "all" else "")
        + f"; {summary['images']} boards, {summary['ground_truths']} defects. Served by `{setup['model']}` at "
        f"`{setup['url']}`, requested with score_threshold {setup['request_score_threshold']:g}; "
        f"{summary['detections']} detections.",
        "",
        "| metric | value |",
        "|---|---:|",
        f"| DeepPCB AP (IoU > 0.33, uninterpolated, pooled) | {100 * deeppcb['ap']:.2f} % |",
        f"| DeepPCB F-score at the deployed score threshold {at['score_threshold']:g} | {100 * at['f_score']:.2f} % |",
        f"| precision / recall at that threshold | {100 * at['precision']:.2f} % / {100 * at['recall']:.2f} % |",
        f"| true positives / false alarms / misses "
        f"| {at['true_positives']} / {at['false_positives']} / {at['false_negatives']} |",
        f"| mAP@0.5 (VOC, all-point, mean over classes) | {100 * summary['voc']['map50']:.2f} % |",
        "",
        "For reference, the DeepPCB paper reports 98.6 % mAP and 98.2 % F-score on the official test split.",
        "",
        "## Per class",
        "",
        "| class | defects | detections | DeepPCB AP | AP@0.5 | precision | recall | F-score |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in summary["per_class"].items():
        c, has_defects = row["at_threshold"], row["ground_truths"] > 0
        has_kept = c["true_positives"] + c["false_positives"] > 0
        cells = [
            name,
            str(row["ground_truths"]),
            str(row["detections"]),
            percent(row["deeppcb_ap"]),
            percent(row["voc_ap50"]),
            percent(c["precision"] if has_kept else None),
            percent(c["recall"] if has_defects else None),
            percent(c["f_score"] if has_defects else None),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "![precision-recall curves](precision_recall.png)", "", "## Examples of misses and false alarms", ""]
    lines.append(
        "Yellow corner brackets mark the labelled defects (thick, with a MISSED label, where the pipeline "
        "missed one); the pipeline's detections at the deployed threshold are the full boxes coloured by class."
        if examples
        else "No misses and no false alarms at the deployed threshold."
    )
    for example in examples:
        lines += [
            "",
            f"`{example['image']}`: {len(example['missed'])} missed ({count_names(example['missed'])}), "
            f"{len(example['false_alarms'])} false alarms ({count_names([a['class'] for a in example['false_alarms']])}).",
            "",
            f"![{Path(example['file']).stem}]({example['file']})",
        ]
    lines += ["", "## How the figures are computed", "", report["method"], ""]
    return "\n".join(lines)


METHOD = (
    "DeepPCB rule, following the ICDAR 2015 script the DeepPCB evaluation adapts: on each board the defects are "
    "visited in annotation-file order and each takes the first still-free detection (detections in descending "
    "score order, as a results file lists them) of the same class whose IoU is strictly above 0.33. AP pools "
    "every detection of every board ranked by score and is uninterpolated: the sum of precision at each true "
    "positive's rank over the number of defects. The F-score counts detections scoring above the deployed "
    "threshold, as the postprocess step keeps them. mAP@0.5 follows PASCAL VOC 2010+: per class, detections by "
    "descending score take the best-IoU defect (IoU > 0.5, each defect once); all-point interpolated AP, averaged "
    "over classes with defects."
)


def write_report(
    samples: Sequence[Sample],
    detections: Sequence,
    setup: EvaluationSetup,
    class_names: Sequence[str],
    out: Path,
    example_count: int = 6,
) -> dict:
    """Compute the metrics of ``detections`` (one per sample, as returned by the client at a low threshold)
    and write report.json, report.md, precision_recall.png and examples/*.png under ``out``."""
    if len(samples) != len(detections):
        raise ValueError(f"{len(samples)} boards but {len(detections)} detection sets")
    out = Path(out)
    (out / "examples").mkdir(parents=True, exist_ok=True)
    deployed_threshold = setup.deployed_score_threshold
    ranked = [ScoredDetections.ranked(d) for d in detections]
    metrics = summarize(samples, ranked, deployed_threshold, class_names)
    report = {"setup": asdict(setup), "metrics": metrics, "method": METHOD}
    plot_precision_recall(samples, ranked, deployed_threshold, class_names, out / "precision_recall.png")

    kept = [d.above(deployed_threshold) for d in ranked]
    examples = []
    for outcome in pick_examples(image_outcomes(samples, kept), example_count):
        sample, shown = samples[outcome.index], kept[outcome.index]
        file = Path("examples") / f"{sample.image_path.stem}.png"
        cv2.imwrite(str(out / file), draw_example(sample, shown, outcome, class_names))
        alarms = zip(shown.classes[outcome.false_alarm], shown.scores[outcome.false_alarm], strict=True)
        examples.append(
            {
                "image": str(sample.image_path),
                "file": str(file),
                "missed": [class_names[c] for c in sample.classes[outcome.missed]],
                "false_alarms": [{"class": class_names[c], "score": round(float(s), 4)} for c, s in alarms],
            }
        )
    report["examples"] = examples
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(markdown_report(report, examples))
    return report


@contextlib.contextmanager
def serving(url: str, start_server: bool, model_repository: Path = MODEL_REPOSITORY):
    """Yield the gRPC address to use: ``url`` as given, or that of a local Triton serving ``model_repository``
    for the duration (CPU configs, free ports so it never collides with a server already running)."""
    if not start_server:
        yield url
        return
    from tools.triton_server import TritonServer

    print(f"starting a local tritonserver on {model_repository} ...", flush=True)
    with TritonServer.on_free_ports(model_repository=model_repository) as server:
        yield server.grpc_url


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_ROOT, help="DeepPCB-format folder")
    parser.add_argument("--list", default="test.txt", help="list file inside --data (test.txt, trainval.txt)")
    parser.add_argument("--split", choices=["all", "val", "train"], default="all", help="part of the list to evaluate")
    parser.add_argument("--val-fraction", type=float, default=0.15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, help="evaluate only the first N boards (quick checks)")
    parser.add_argument("--url", default="localhost:8001", help="Triton gRPC address")
    parser.add_argument("--start-server", action="store_true", help="start a local Triton (CPU configs) for the run")
    parser.add_argument("--model", default="pcb_pipeline")
    parser.add_argument(
        "--request-score-threshold",
        type=float,
        default=LOW_SCORE_THRESHOLD,
        help="score_threshold sent with each request; low so AP sees the whole ranking",
    )
    parser.add_argument(
        "--model-repository",
        type=Path,
        default=MODEL_REPOSITORY,
        help="repository whose postprocess config holds the deployed threshold (and that --start-server serves)",
    )
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight")
    parser.add_argument("--examples", type=int, default=6, help="annotated boards to write")
    parser.add_argument("--out", type=Path, default=Path("reports/eval"))
    from tools.client import PipelineClient, add_tiling_arguments, load_labels, tile_spec

    add_tiling_arguments(parser)
    args = parser.parse_args(argv)
    tiles = tile_spec(args)

    samples = select_samples(args.data, args.list, args.split, args.val_fraction, args.seed)[: args.limit]
    if not samples:
        raise SystemExit(f"no boards selected from {args.data / args.list} (split {args.split})")
    config = args.model_repository / "postprocess" / "config.pbtxt"
    threshold = deployed_score_threshold(config)
    class_names = load_labels()
    with serving(args.url, args.start_server, args.model_repository) as url:
        with PipelineClient(url=url, model_name=args.model) as client:
            detections = client.infer_files(
                [s.image_path for s in samples],
                score_threshold=args.request_score_threshold,
                concurrency=args.concurrency,
                tiles=tiles,
            )
    setup = EvaluationSetup(
        data=str(args.data),
        list=args.list,
        split=args.split,
        val_fraction=args.val_fraction,
        seed=args.seed,
        url=url,
        model=args.model,
        request_score_threshold=args.request_score_threshold,
        deployed_score_threshold=threshold,
        config=str(config),
        tiles=asdict(tiles) if tiles else None,
    )
    report = write_report(samples, detections, setup, class_names, args.out, args.examples)
    m = report["metrics"]
    print(
        f"{m['images']} boards, {m['ground_truths']} defects: DeepPCB AP {100 * m['deeppcb']['ap']:.2f} %, "
        f"F-score {100 * m['deeppcb']['at_threshold']['f_score']:.2f} % at score {threshold:g}, "
        f"mAP@0.5 {100 * m['voc']['map50']:.2f} %. Report: {args.out / 'report.md'}"
    )
    return report


if __name__ == "__main__":
    main()
