"""The evaluation report: metrics of one run, the examples worth looking at, report.md/json and pictures."""
from __future__ import annotations

import collections
import itertools
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from tools.data.deeppcb import Sample
from tools.detections import Detections
from tools.eval.metrics import match_in_file_order, summarize
from tools.eval.pictures import draw_example, plot_precision_recall


@dataclass(frozen=True)
class EvaluationSetup:
    """What was evaluated and how; goes into the report as is."""

    data: str
    list: str
    split: str
    val_fraction: float
    split_seed: int
    url: str
    model: str
    request_score_threshold: float  # sent with every request, low so AP sees the whole ranking
    deployed_score_threshold: float  # the postprocess default, where the F-score is taken
    config: str  # the model folder whose config holds the deployed threshold


@dataclass(frozen=True)
class ImageOutcome:
    """What went wrong on one board at the deployed threshold."""

    index: int
    missed: np.ndarray  # (n_gt,) bool
    false_alarm: np.ndarray  # (n_det,) bool, over the detections kept at the threshold


def image_outcomes(samples: Sequence[Sample], kept: Sequence[Detections]) -> list[ImageOutcome]:
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
        + (f" (val fraction {setup['val_fraction']}, seed {setup['split_seed']})" if setup["split"] != "all" else "")
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
    ranked = [d.ranked() for d in detections]
    metrics = summarize(samples, ranked, deployed_threshold, class_names)
    report = {"setup": asdict(setup), "metrics": metrics, "method": METHOD}
    plot_precision_recall(samples, ranked, deployed_threshold, class_names, out / "precision_recall.png")

    kept = [d.above(deployed_threshold) for d in ranked]
    examples = []
    for outcome in pick_examples(image_outcomes(samples, kept), example_count):
        sample, shown = samples[outcome.index], kept[outcome.index]
        file = Path("examples") / f"{sample.image_path.stem}.png"
        cv2.imwrite(str(out / file), draw_example(sample, shown, outcome.missed, class_names))
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
