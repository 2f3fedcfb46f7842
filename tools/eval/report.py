"""The evaluation report: metrics of one run, the examples worth looking at, report.md/json and pictures; with
templates, how the served registration placed them."""
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
from tools.data.splits import sample_group
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
    val_groups: tuple[str, ...]  # whole groups held out (then fraction and seed do not apply)
    url: str
    model: str
    request_score_threshold: float  # sent with every request, low so AP sees the whole ranking
    # postprocess's defaults, where the F-score is taken: for boards without a template, with a registered one
    deployed_score_threshold: float
    deployed_template_score_threshold: float
    config: str  # the model folder whose config holds the deployed thresholds
    detector: str  # the folder of the detector files served
    templates: str = "none"  # "none", "as given" (each board's own template) or "misregistered"
    misregister_shift: float = 0.0  # px, the largest random drift of a misregistered template (each axis)
    misregister_angle: float = 0.0  # degrees
    misregister_seed: int = 0


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


def spread(values) -> dict | None:
    values = np.asarray(values, np.float64).reshape(-1)
    if not len(values):
        return None
    return {"min": float(values.min()), "mean": float(values.mean()), "median": float(np.median(values)),
            "p95": float(np.percentile(values, 95)), "max": float(values.max())}


def registration_summary(samples: Sequence[Sample], detections: Sequence[Detections],
                         expected: Sequence[np.ndarray] | None = None, refused: dict[str, str] | None = None) -> dict:
    """How the served registration placed the templates: score spread over every registration (a board, or a
    scan's tiles), and with ``expected`` (one (tiles, 3) dx, dy, angle per board, from the known drift) the
    error: shift distance in px and absolute angle difference. ``refused``: boards whose template the server
    refused (inspected without one), with why. Per-board rows go to report.json."""
    refused = refused or {}
    boards, scores, shift_errors, angle_errors = [], [], [], []
    for index, (sample, found) in enumerate(zip(samples, detections, strict=True)):
        if found.registration is None:
            continue
        rows = np.asarray(found.registration, np.float64).reshape(-1, 4)
        board = {"image": str(sample.image_path), "registration": np.round(rows, 4).tolist()}
        scores += rows[:, 3].tolist()
        if expected is not None:
            wanted = np.asarray(expected[index], np.float64).reshape(-1, 3)
            shift = np.hypot(rows[:, 0] - wanted[:, 0], rows[:, 1] - wanted[:, 1])
            angle = np.abs(rows[:, 2] - wanted[:, 2])
            board |= {"expected": np.round(wanted, 4).tolist(), "shift_error_px": np.round(shift, 3).tolist(),
                      "angle_error_deg": np.round(angle, 4).tolist()}
            shift_errors += shift.tolist()
            angle_errors += angle.tolist()
        boards.append(board)
    summary = {
        "templates": "misregistered" if expected is not None else "as given",
        "registered": len(boards),
        "registrations": len(scores),
        "score": spread(scores),
        "refused": [{"image": image, "error": why} for image, why in refused.items()],
        "boards": boards,
    }
    if expected is not None:
        summary["error"] = {"shift_px": spread(shift_errors), "angle_deg": spread(angle_errors)}
    return summary


def registration_lines(summary: dict) -> list[str]:
    """The report.md section on the templates' registration."""
    lines = ["## Registration of the templates", ""]
    per = "registration" if summary["registrations"] == summary["registered"] else "tile registration"
    lines.append(f"Templates {summary['templates']}: {summary['registered']} boards registered "
                 f"({summary['registrations']} {per}s), {len(summary['refused'])} refused by the server "
                 "(inspected without a template).")
    rows = [("score (ECC correlation, 0 to 1)", summary["score"], "{:.3f}")]
    if "error" in summary:
        rows += [("shift error against the known drift (px)", summary["error"]["shift_px"], "{:.2f}"),
                 ("angle error against the known drift (deg)", summary["error"]["angle_deg"], "{:.3f}")]
    lines += ["", "| | min | mean | median | p95 | max |", "|---|---:|---:|---:|---:|---:|"]
    for name, values, form in rows:
        if values is not None:
            lines.append(f"| {name} | " + " | ".join(form.format(values[k]) for k in
                                                    ("min", "mean", "median", "p95", "max")) + " |")
    if "error" in summary:
        lines += ["", "The error is measured against the drift applied to each template; DeepPCB templates "
                      "themselves sit up to about 4 px off their images, and that offset is part of it."]
    for item in summary["refused"][:20]:
        lines.append(f"- `{item['image']}`: {item['error']}")
    return lines + [""]


def percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f} %"


def count_names(names: Sequence[str]) -> str:
    """'open x2, spur' style summary of a list of class names, or '-' when empty."""
    counts = collections.Counter(names)
    return ", ".join(f"{name} x{n}" if n > 1 else name for name, n in counts.most_common()) or "-"


def template_setup(setup: dict) -> str:
    mode = setup.get("templates", "none")
    if mode == "none":
        return "none sent (single-image mode)"
    if mode == "misregistered":
        return (f"each board's own, moved by a random drift of up to ±{setup['misregister_shift']:g} px and "
                f"±{setup['misregister_angle']:g} deg (seed {setup['misregister_seed']})")
    return "each board's own, as given"


def threshold_description(used, setup: dict) -> str:
    """The deployed threshold(s) the boards were judged at, each with its kind: "s 0.5 (a registered template)
    and 0.65 (no template)", or " 0.6" where the two defaults are one."""
    kinds = {setup["deployed_score_threshold"]: "no template",
             setup["deployed_template_score_threshold"]: "a registered template"}
    if len(kinds) == 1:  # the two defaults are the same
        return f" {next(iter(kinds)):g}"
    return "s " + " and ".join(f"{t:g} ({kinds.get(t, 'given')})" for t in np.atleast_1d(used))


def split_description(setup: dict) -> str:
    if setup.get("val_groups"):
        return f" (whole groups held out of training: {', '.join(setup['val_groups'])})"
    return f" (val fraction {setup['val_fraction']}, seed {setup['split_seed']})"


def per_design(samples: Sequence[Sample], ranked: Sequence[Detections], score_thresholds: Sequence[float],
               class_names: Sequence[str]) -> dict:
    """The headline figures of each group (board design), where the boards come from more than one: new designs
    differ far more from each other than boards of one design do."""
    boards = collections.defaultdict(list)
    for index, sample in enumerate(samples):
        boards[sample_group(sample)].append(index)
    if len(boards) < 2:
        return {}
    figures = {}
    for group, indices in sorted(boards.items()):
        summary = summarize([samples[i] for i in indices], [ranked[i] for i in indices],
                            [score_thresholds[i] for i in indices], class_names)
        figures[group] = {"images": summary["images"], "ground_truths": summary["ground_truths"],
                          "deeppcb": {key: summary["deeppcb"][key] for key in ("ap", "at_threshold")},
                          "deeppcb_regardless_of_class": summary["deeppcb_regardless_of_class"]}
    return figures


def per_design_lines(figures: dict) -> list[str]:
    lines = ["## Per design (DeepPCB group)", "",
             "| group | boards | defects | DeepPCB AP | F-score | true / false alarms / misses "
             "| regardless of class: AP / F-score |", "|---|---:|---:|---:|---:|---:|---:|"]
    for group, row in figures.items():
        at, located = row["deeppcb"]["at_threshold"], row["deeppcb_regardless_of_class"]
        lines.append(f"| {group} | {row['images']} | {row['ground_truths']} | {percent(row['deeppcb']['ap'])} "
                     f"| {percent(at['f_score'])} | {at['true_positives']} / {at['false_positives']} / "
                     f"{at['false_negatives']} | {percent(located['ap'])} / "
                     f"{percent(located['at_threshold']['f_score'])} |")
    return lines


def markdown_report(report: dict, examples: list[dict]) -> str:
    summary, setup = report["metrics"], report["setup"]
    deeppcb, at = summary["deeppcb"], summary["deeppcb"]["at_threshold"]
    located, located_at = summary["deeppcb_regardless_of_class"], summary["deeppcb_regardless_of_class"]["at_threshold"]
    lines = [
        "# Accuracy of the served pipeline",
        "",
        f"Data: `{setup['data']}` list `{setup['list']}`, split `{setup['split']}`"
        + (split_description(setup) if setup["split"] != "all" else "")
        + f"; {summary['images']} boards, {summary['ground_truths']} defects. Served by `{setup['model']}` "
        f"(detector `{setup['detector']}`) at "
        f"`{setup['url']}`, requested with score_threshold {setup['request_score_threshold']:g}; "
        f"{summary['detections']} detections. Templates: {template_setup(setup)}.",
        "",
        "| metric | value |",
        "|---|---:|",
        f"| DeepPCB AP (IoU > 0.33, uninterpolated, pooled) | {100 * deeppcb['ap']:.2f} % |",
        f"| DeepPCB F-score at the deployed score threshold{threshold_description(at['score_threshold'], setup)} "
        f"| {100 * at['f_score']:.2f} % |",
        f"| precision / recall at that threshold | {100 * at['precision']:.2f} % / {100 * at['recall']:.2f} % |",
        f"| true positives / false alarms / misses "
        f"| {at['true_positives']} / {at['false_positives']} / {at['false_negatives']} |",
        f"| regardless of class (where the defects are): DeepPCB AP / F-score "
        f"| {100 * located['ap']:.2f} % / {100 * located_at['f_score']:.2f} % |",
        f"| regardless of class: true positives / false alarms / misses "
        f"| {located_at['true_positives']} / {located_at['false_positives']} / {located_at['false_negatives']} |",
        f"| mAP@0.5 (VOC, all-point, mean over classes) | {100 * summary['voc']['map50']:.2f} % |",
        "",
        "F-score by score threshold (to choose the deployed one on validation data): "
        + ", ".join(f"{t} {100 * f:.2f} %" for t, f in deeppcb["f_by_threshold"].items()) + ".",
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
    if report.get("per_design"):
        lines += ["", *per_design_lines(report["per_design"])]
    if report.get("registration") is not None:
        lines += ["", *registration_lines(report["registration"])]
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
    "threshold of their board (postprocess's template_score_threshold where the board's template registered, "
    "its score_threshold otherwise), as the postprocess step keeps them. 'Regardless of class' applies the same "
    "rule with every class made one: a detection of the wrong class at a defect then counts, a second detection "
    "of one defect stays a false alarm; the gap to the figures above is what the class alone costs. mAP@0.5 "
    "follows PASCAL VOC 2010+: per class, detections by descending score take the best-IoU defect (IoU > 0.5, "
    "each defect once); all-point interpolated AP, averaged over classes with defects."
)


def write_report(
    samples: Sequence[Sample],
    detections: Sequence,
    setup: EvaluationSetup,
    class_names: Sequence[str],
    out: Path,
    example_count: int = 6,
    registration: dict | None = None,
    score_thresholds: Sequence[float] | None = None,
) -> dict:
    """Compute the metrics of ``detections`` (one per sample, as returned by the client at a low threshold)
    and write report.json, report.md, precision_recall.png and examples/*.png under ``out``. The F-score and
    the examples are taken at ``score_thresholds``, each board's deployed one (default: the setup's no-template
    one for all). ``registration`` (``registration_summary``, when templates were sent) goes into both reports."""
    if len(samples) != len(detections):
        raise ValueError(f"{len(samples)} boards but {len(detections)} detection sets")
    out = Path(out)
    (out / "examples").mkdir(parents=True, exist_ok=True)
    if score_thresholds is None:
        score_thresholds = [setup.deployed_score_threshold] * len(samples)
    ranked = [d.ranked() for d in detections]
    metrics = summarize(samples, ranked, score_thresholds, class_names)
    report = {"setup": asdict(setup), "metrics": metrics, "method": METHOD,
              "per_design": per_design(samples, ranked, score_thresholds, class_names)}
    if registration is not None:
        report["registration"] = registration
    plot_precision_recall(samples, ranked, score_thresholds, class_names, out / "precision_recall.png")

    kept = [d.above(threshold) for d, threshold in zip(ranked, score_thresholds, strict=True)]
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
