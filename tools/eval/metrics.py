"""Detection accuracy metrics: the DeepPCB benchmark rule and the wider field's mAP@0.5.

DeepPCB rule (the dataset's official evaluation). Its README says the script is the ICDAR 2015 robust-reading
evaluation with a small change (the class must agree); the matching and AP below follow that ICDAR script:

* per image, ground-truth boxes are visited in file order and each takes the first still-free detection (in
  the detections' file order) of the SAME class whose IoU with it is strictly above 0.33; every other
  detection is a false positive (so a second detection of an already found defect is one);
* AP is pooled over every detection of the dataset ranked by score, *uninterpolated*: the sum of the
  precision at the rank of each true positive, divided by the number of ground-truth boxes;
* F-score = 2PR / (P + R) over the detections kept at a chosen score threshold (score strictly above it,
  as the pipeline's postprocess keeps them).

Our detections come out of NMS sorted by descending score, and the evaluator keeps that order, so "file
order" is score order. With that order, matching once at a low threshold and then cutting at a higher
score gives exactly the pairs matching the cut set would give, so one matching serves AP and the F-score.

Wider field (PASCAL VOC 2010+ protocol, what "mAP@0.5" means in most PCB papers): per class, detections
taken by descending score take the highest-IoU ground truth of their class; IoU strictly above 0.5 and
that ground truth not yet taken makes a true positive. AP is the all-point interpolated area under the
precision-recall curve; mAP is the mean over the classes that have ground truth.

Inputs are duck-typed so datasets and the gRPC client plug straight in: a ground truth has ``boxes``
(n, 4) x1 y1 x2 y2 pixels and ``classes`` (n,) 0-based; a prediction also has ``scores`` (n,).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from types import SimpleNamespace
from typing import Literal, Sequence

import numpy as np

from tools.detections import above_threshold, box_iou

DEEPPCB_IOU_THRESHOLD = 0.33
VOC_IOU_THRESHOLD = 0.5
MatchingRule = Literal["file_order", "voc"]


def match_in_file_order(
    gt_boxes: np.ndarray,
    gt_classes: np.ndarray,
    det_boxes: np.ndarray,
    det_classes: np.ndarray,
    iou_threshold: float = DEEPPCB_IOU_THRESHOLD,
) -> tuple[np.ndarray, np.ndarray]:
    """DeepPCB/ICDAR pairing of one image. Returns (detection is a true positive, ground truth was found)."""
    gt_classes = np.asarray(gt_classes).reshape(-1)
    det_classes = np.asarray(det_classes).reshape(-1)
    eligible = (box_iou(gt_boxes, det_boxes) > iou_threshold) & (gt_classes[:, None] == det_classes[None, :])
    det_taken = np.zeros(len(det_classes), dtype=bool)
    gt_found = np.zeros(len(gt_classes), dtype=bool)
    for gt_index in range(len(gt_classes)):
        free = eligible[gt_index] & ~det_taken
        if free.any():
            det_taken[np.argmax(free)] = True  # argmax of a bool row = first True = first in file order
            gt_found[gt_index] = True
    return det_taken, gt_found


def match_voc(
    gt_boxes: np.ndarray,
    gt_classes: np.ndarray,
    det_boxes: np.ndarray,
    det_scores: np.ndarray,
    det_classes: np.ndarray,
    iou_threshold: float = VOC_IOU_THRESHOLD,
) -> tuple[np.ndarray, np.ndarray]:
    """PASCAL VOC pairing of one image. Returns (detection is a true positive, ground truth was found)."""
    gt_classes = np.asarray(gt_classes).reshape(-1)
    det_classes = np.asarray(det_classes).reshape(-1)
    iou = box_iou(det_boxes, gt_boxes)
    iou[det_classes[:, None] != gt_classes[None, :]] = -1.0  # other classes never count as the best overlap
    is_true_positive = np.zeros(len(det_classes), dtype=bool)
    gt_found = np.zeros(len(gt_classes), dtype=bool)
    if len(gt_classes) == 0:
        return is_true_positive, gt_found
    for det_index in np.argsort(-np.asarray(det_scores, dtype=np.float64), kind="stable"):
        best_gt = np.argmax(iou[det_index])
        if iou[det_index, best_gt] > iou_threshold and not gt_found[best_gt]:
            gt_found[best_gt] = True
            is_true_positive[det_index] = True
    return is_true_positive, gt_found


def match_image(ground_truth, prediction, rule: MatchingRule, iou_threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Pair one image's prediction with its ground truth by ``rule``."""
    if rule == "file_order":
        return match_in_file_order(
            ground_truth.boxes, ground_truth.classes, prediction.boxes, prediction.classes, iou_threshold
        )
    if rule == "voc":
        return match_voc(
            ground_truth.boxes,
            ground_truth.classes,
            prediction.boxes,
            prediction.scores,
            prediction.classes,
            iou_threshold,
        )
    raise ValueError(f"unknown matching rule {rule!r}; use 'file_order' or 'voc'")


@dataclass(frozen=True)
class RankedDetections:
    """Every detection of a dataset, ranked by descending score, with its match outcome."""

    scores: np.ndarray  # (N,) descending, in the predictions' own float type
    classes: np.ndarray  # (N,) int64
    is_true_positive: np.ndarray  # (N,) bool
    gt_per_class: np.ndarray  # (num_classes,) int64: ground-truth boxes of each class
    images: np.ndarray  # (N,) int64: the index of each detection's image

    def of_class(self, class_id: int | None) -> tuple[np.ndarray, np.ndarray, int]:
        """(scores, true-positive flags, ground-truth count) of one class, or of all when ``class_id`` is None."""
        if class_id is None:
            return self.scores, self.is_true_positive, int(self.gt_per_class.sum())
        keep = self.classes == class_id
        return self.scores[keep], self.is_true_positive[keep], int(self.gt_per_class[class_id])

    def thresholds_of(self, score_threshold, class_id: int | None) -> float | np.ndarray:
        """``score_threshold`` as ``of_class`` lines up: one number as it is, one per image as one per detection."""
        per_image = np.asarray(score_threshold, dtype=np.float64)
        if per_image.ndim == 0:
            return float(per_image)
        per_detection = per_image[self.images]
        return per_detection if class_id is None else per_detection[self.classes == class_id]


def rank_detections(
    ground_truths: Sequence,
    predictions: Sequence,
    rule: MatchingRule,
    iou_threshold: float,
    num_classes: int,
) -> RankedDetections:
    """Match each image separately, then pool every detection and rank by score (ties keep file order)."""
    if len(ground_truths) != len(predictions):
        raise ValueError(f"{len(ground_truths)} ground truths but {len(predictions)} predictions")
    matches = [
        match_image(gt, pred, rule, iou_threshold)[0] for gt, pred in zip(ground_truths, predictions, strict=True)
    ]
    scores = _pooled([p.scores for p in predictions], np.float32)
    classes = _pooled([p.classes for p in predictions], np.int64).astype(np.int64)
    is_true_positive = _pooled(matches, bool)
    images = _pooled([np.full(len(p.scores), i) for i, p in enumerate(predictions)], np.int64).astype(np.int64)
    gt_classes = _pooled([g.classes for g in ground_truths], np.int64).astype(np.int64)
    order = np.argsort(-scores, kind="stable")
    return RankedDetections(
        scores=scores[order],
        classes=classes[order],
        is_true_positive=is_true_positive[order],
        gt_per_class=np.bincount(gt_classes, minlength=num_classes).astype(np.int64),
        images=images[order],
    )


def _pooled(arrays: list, empty_dtype) -> np.ndarray:
    """All per-image arrays end to end (their own dtype kept), or an empty ``empty_dtype`` array."""
    return np.concatenate([np.asarray(a).reshape(-1) for a in arrays]) if arrays else np.zeros(0, empty_dtype)


def precision_recall_curve(
    ranked: RankedDetections, class_id: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(precision, recall, score) after each ranked detection; recall is 0 throughout when there is no ground truth."""
    scores, is_true_positive, num_gt = ranked.of_class(class_id)
    true_positives = np.cumsum(is_true_positive)
    precision = true_positives / np.arange(1, len(scores) + 1)
    recall = true_positives / num_gt if num_gt else np.zeros(len(scores))
    return precision, recall, scores


def average_precision_uninterpolated(ranked: RankedDetections, class_id: int | None = None) -> float:
    """ICDAR/DeepPCB AP: sum of the precision at each true positive's rank over the ground-truth count."""
    precision, _, _ = precision_recall_curve(ranked, class_id)
    _, is_true_positive, num_gt = ranked.of_class(class_id)
    return float(precision[is_true_positive].sum() / num_gt) if num_gt else 0.0


def average_precision_all_point(ranked: RankedDetections, class_id: int | None = None) -> float:
    """VOC 2010+ AP: area under the precision envelope (precision made non-increasing in recall)."""
    precision, recall, _ = precision_recall_curve(ranked, class_id)
    if not ranked.of_class(class_id)[2]:
        return 0.0
    recall_points = np.concatenate([[0.0], recall, [1.0]])
    envelope = np.maximum.accumulate(np.concatenate([[0.0], precision, [0.0]])[::-1])[::-1]
    steps = np.flatnonzero(recall_points[1:] != recall_points[:-1])
    return float(np.sum((recall_points[steps + 1] - recall_points[steps]) * envelope[steps + 1]))


@dataclass(frozen=True)
class OperatingPoint:
    """Counts and rates of the detections kept at a score threshold (one, or each image's own)."""

    score_threshold: float | list[float]  # one, or the distinct thresholds of the images
    true_positives: int
    false_positives: int
    false_negatives: int
    precision: float
    recall: float
    f_score: float


def operating_point(ranked: RankedDetections, score_threshold, class_id: int | None = None) -> OperatingPoint:
    """Precision, recall and F-score of the detections scoring above ``score_threshold`` (what the pipeline keeps):
    one threshold, or a sequence of one per image (postprocess judges an image by whether its template registered)."""
    scores, is_true_positive, num_gt = ranked.of_class(class_id)
    kept = above_threshold(scores, ranked.thresholds_of(score_threshold, class_id))
    true_positives = int(np.count_nonzero(is_true_positive & kept))
    false_positives = int(np.count_nonzero(kept)) - true_positives
    precision = true_positives / (true_positives + false_positives) if true_positives + false_positives else 0.0
    recall = true_positives / num_gt if num_gt else 0.0
    f_score = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return OperatingPoint(
        score_threshold=(float(score_threshold) if np.ndim(score_threshold) == 0
                         else sorted({float(t) for t in score_threshold})),
        true_positives=true_positives,
        false_positives=false_positives,
        false_negatives=num_gt - true_positives,
        precision=precision,
        recall=recall,
        f_score=f_score,
    )


THRESHOLD_SWEEP = np.round(np.arange(0.30, 0.851, 0.05), 2)


def without_classes(items: Sequence) -> list:
    """Copies of ground truths or predictions with every class made 0: the DeepPCB rule then asks only where the
    defects are (a detection of another class at the same place, or a second one there, stays a false alarm)."""
    return [SimpleNamespace(boxes=item.boxes, scores=getattr(item, "scores", None),
                            classes=np.zeros(len(item.classes), np.int64)) for item in items]


def summarize(
    ground_truths: Sequence,
    predictions: Sequence,
    score_threshold,
    class_names: Sequence[str],
) -> dict:
    """Every headline figure as a JSON-ready dict: DeepPCB AP and F-score, VOC mAP@0.5, all per class too. The
    F-score is taken at ``score_threshold``: one, or one per image (``operating_point``)."""
    deeppcb = rank_detections(ground_truths, predictions, "file_order", DEEPPCB_IOU_THRESHOLD, len(class_names))
    voc = rank_detections(ground_truths, predictions, "voc", VOC_IOU_THRESHOLD, len(class_names))
    located = rank_detections(without_classes(ground_truths), without_classes(predictions), "file_order",
                              DEEPPCB_IOU_THRESHOLD, len(class_names))
    classes_with_gt = [c for c in range(len(class_names)) if voc.gt_per_class[c]]
    voc_ap = {class_names[c]: average_precision_all_point(voc, c) for c in range(len(class_names))}
    per_class = {  # AP of a class without defects is undefined: None (JSON null), not a made-up 0
        name: {
            "ground_truths": int(deeppcb.gt_per_class[c]),
            "detections": int(np.count_nonzero(deeppcb.classes == c)),
            "deeppcb_ap": average_precision_uninterpolated(deeppcb, c) if c in classes_with_gt else None,
            "voc_ap50": voc_ap[name] if c in classes_with_gt else None,
            "at_threshold": asdict(operating_point(deeppcb, score_threshold, c)),
        }
        for c, name in enumerate(class_names)
    }
    return {
        "images": len(ground_truths),
        "ground_truths": int(deeppcb.gt_per_class.sum()),
        "detections": int(len(deeppcb.scores)),
        "deeppcb": {
            "iou_threshold": DEEPPCB_IOU_THRESHOLD,
            "ap": average_precision_uninterpolated(deeppcb),
            "at_threshold": asdict(operating_point(deeppcb, score_threshold)),
            # To choose the deployed threshold on validation data: the F-score around it.
            "f_by_threshold": {f"{t:.2f}": operating_point(deeppcb, t).f_score for t in THRESHOLD_SWEEP},
        },
        # How much of what is lost is the class alone (open vs mousebite, short vs spur on new designs).
        "deeppcb_regardless_of_class": {
            "ap": average_precision_uninterpolated(located),
            "at_threshold": asdict(operating_point(located, score_threshold)),
        },
        "voc": {
            "iou_threshold": VOC_IOU_THRESHOLD,
            "map50": float(np.mean([voc_ap[class_names[c]] for c in classes_with_gt])) if classes_with_gt else 0.0,
        },
        "per_class": per_class,
    }
