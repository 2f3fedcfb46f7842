"""Pictures of an evaluation: boards with their labelled and detected defects, and precision-recall curves."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from tools.client.annotate import draw_detections
from tools.data.deeppcb import Sample
from tools.detections import Detections
from tools.eval.metrics import (
    DEEPPCB_IOU_THRESHOLD,
    VOC_IOU_THRESHOLD,
    operating_point,
    precision_recall_curve,
    rank_detections,
)

TRUTH_COLOUR = (0, 255, 255)  # BGR yellow: not in tools.client.annotate's class palette
OUTLINE_COLOUR = (0, 0, 0)


def draw_corner_marks(image: np.ndarray, corners: tuple[int, int, int, int], thickness: int) -> None:
    """Yellow corner brackets with a black outline: a ground-truth style unlike tools.client.annotate's class-coloured
    full boxes, and visible on black copper and white substrate alike."""
    x1, y1, x2, y2 = corners
    arm = max(4, min(x2 - x1, y2 - y1) // 3)
    for colour, width in ((OUTLINE_COLOUR, thickness + 2), (TRUTH_COLOUR, thickness)):
        for x, y, dx, dy in ((x1, y1, 1, 1), (x2, y1, -1, 1), (x1, y2, 1, -1), (x2, y2, -1, -1)):
            cv2.line(image, (x, y), (x + dx * arm, y), colour, width)
            cv2.line(image, (x, y), (x, y + dy * arm), colour, width)


def draw_example(
    sample: Sample, detections: Detections, missed: np.ndarray, class_names: Sequence[str]
) -> np.ndarray:
    """The board with its ground truth as corner brackets (thick and labelled MISSED where the pipeline missed
    the defect) under the pipeline's detections at the deployed threshold (drawn by tools.client.annotate)."""
    image = cv2.imread(str(sample.image_path), cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError(f"{sample.image_path}: not a readable image")
    for box, class_id, was_missed in zip(sample.boxes, sample.classes, missed, strict=True):
        x1, y1, x2, y2 = (int(v) for v in box)
        thickness, pad = (3, 4) if was_missed else (1, 2)
        draw_corner_marks(image, (x1 - pad, y1 - pad, x2 + pad, y2 + pad), thickness)
        if was_missed:
            origin, font, text = (x1 - pad, y2 + pad + 14), cv2.FONT_HERSHEY_SIMPLEX, f"MISSED {class_names[class_id]}"
            cv2.putText(image, text, origin, font, 0.45, OUTLINE_COLOUR, 3, cv2.LINE_AA)
            cv2.putText(image, text, origin, font, 0.45, TRUTH_COLOUR, 1, cv2.LINE_AA)
    return draw_detections(image, detections, class_names)


def plot_precision_recall(
    ground_truths, predictions, score_threshold, class_names: Sequence[str], path: Path
) -> None:
    """PR curves per class and overall, under both rules, with the deployed operating point marked (at one
    score threshold, or one per image)."""
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
        precision, recall, _ = precision_recall_curve(ranked)
        axis.plot(recall, precision, color="black", linewidth=2.2, label="all classes")
        deployed = operating_point(ranked, score_threshold)
        if deployed.true_positives + deployed.false_positives:
            thresholds = np.atleast_1d(deployed.score_threshold)
            axis.plot(deployed.recall, deployed.precision, "o", color="red", markersize=8,
                      label="score > " + " / ".join(f"{t:g}" for t in thresholds))
        axis.set(title=title, xlabel="recall", xlim=(0, 1.01), ylim=(0, 1.01))
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("precision")
    axes[1].legend(loc="lower left", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
