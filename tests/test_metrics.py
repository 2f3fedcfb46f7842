"""tools.eval.metrics against small cases worked out by hand (the arithmetic is in the comments)."""

from types import SimpleNamespace

import numpy as np
import pytest

from tools.detections import box_iou
from tools.eval.metrics import (
    average_precision_all_point,
    average_precision_uninterpolated,
    match_in_file_order,
    match_voc,
    operating_point,
    precision_recall_curve,
    rank_detections,
    summarize,
)

CLASS_NAMES = ("open", "short", "mousebite", "spur", "copper", "pin-hole")


def truth(boxes, classes):
    return SimpleNamespace(boxes=np.array(boxes, np.float32).reshape(-1, 4), classes=np.array(classes, np.int64))


def prediction(boxes, scores, classes):
    return SimpleNamespace(
        boxes=np.array(boxes, np.float32).reshape(-1, 4),
        scores=np.array(scores, np.float32),
        classes=np.array(classes, np.int32),
    )


def test_box_iou_values():
    # [0,0,10,10] vs [5,0,15,10]: overlap 5x10 = 50, union 100 + 100 - 50 = 150 -> 1/3.
    # [0,0,10,10] vs [20,20,30,30]: no overlap -> 0.  A degenerate (zero-area) box against itself -> 0, not NaN.
    iou = box_iou([[0, 0, 10, 10], [3, 3, 3, 3]], [[5, 0, 15, 10], [20, 20, 30, 30], [3, 3, 3, 3]])
    np.testing.assert_allclose(iou, [[1 / 3, 0, 0], [0, 0, 0]])


def test_iou_exactly_033_is_not_a_match_but_034_is():
    # GT [0,0,100,1] has area 100. Detection [0,0,33,1] lies inside it: IoU = 33 / 100 = 0.33, not > 0.33.
    # Detection [0,0,34,1]: IoU = 34 / 100 = 0.34 > 0.33.
    assert box_iou([[0, 0, 100, 1]], [[0, 0, 33, 1]])[0, 0] == 0.33
    det_tp, gt_found = match_in_file_order([[0, 0, 100, 1]], [0], [[0, 0, 33, 1]], [0])
    assert not det_tp[0] and not gt_found[0]
    det_tp, gt_found = match_in_file_order([[0, 0, 100, 1]], [0], [[0, 0, 34, 1]], [0])
    assert det_tp[0] and gt_found[0]


def test_class_mismatch_is_a_false_positive_and_a_miss():
    # Same box, GT class 0 (open) but detection class 1 (short): no pair under either rule.
    for det_tp, gt_found in (
        match_in_file_order([[0, 0, 10, 10]], [0], [[0, 0, 10, 10]], [1]),
        match_voc([[0, 0, 10, 10]], [0], [[0, 0, 10, 10]], [0.9], [1]),
    ):
        assert det_tp.tolist() == [False] and gt_found.tolist() == [False]


def test_duplicate_detection_of_one_defect_is_a_false_positive():
    # Two class-0 detections of the one class-0 defect: the first (file order / higher score) takes it,
    # the second finds it taken -> false positive.
    gt_boxes, dets = [[0, 0, 10, 10]], [[0, 0, 10, 10], [1, 0, 11, 10]]
    det_tp, gt_found = match_in_file_order(gt_boxes, [0], dets, [0, 0])
    assert det_tp.tolist() == [True, False] and gt_found.tolist() == [True]
    det_tp, gt_found = match_voc(gt_boxes, [0], dets, [0.8, 0.9], [0, 0])
    # VOC visits by score: detection 1 (0.9, IoU 90/110 = 0.82) takes the defect, detection 0 is the duplicate.
    assert det_tp.tolist() == [False, True] and gt_found.tolist() == [True]


def test_file_order_decides_who_takes_a_shared_detection():
    # GT0 [0,0,10,10], GT1 [6,0,16,10]. DetA [3,0,13,10] overlaps both: 70 / 130 = 0.54 each.
    # DetB [0,0,10,10] is GT0 exactly; with GT1 it overlaps 40 / 160 = 0.25 (too little).
    gt_boxes, gt_classes = [[0, 0, 10, 10], [6, 0, 16, 10]], [0, 0]
    # Order (DetA, DetB): GT0 takes the first eligible, DetA; GT1 then only has DetB at 0.25 -> missed.
    det_tp, gt_found = match_in_file_order(gt_boxes, gt_classes, [[3, 0, 13, 10], [0, 0, 10, 10]], [0, 0])
    assert det_tp.tolist() == [True, False] and gt_found.tolist() == [True, False]
    # Order (DetB, DetA): GT0 takes DetB, GT1 takes DetA -> both found.
    det_tp, gt_found = match_in_file_order(gt_boxes, gt_classes, [[0, 0, 10, 10], [3, 0, 13, 10]], [0, 0])
    assert det_tp.tolist() == [True, True] and gt_found.tolist() == [True, True]


def test_empty_images():
    # No ground truth: both detections are false positives. No detections: the defect is missed.
    det_tp, gt_found = match_in_file_order(np.zeros((0, 4)), [], [[0, 0, 5, 5], [9, 9, 20, 20]], [2, 3])
    assert det_tp.tolist() == [False, False] and gt_found.shape == (0,)
    det_tp, gt_found = match_voc(np.zeros((0, 4)), [], [[0, 0, 5, 5]], [0.5], [2])
    assert det_tp.tolist() == [False]
    det_tp, gt_found = match_in_file_order([[0, 0, 5, 5]], [4], np.zeros((0, 4)), [])
    assert det_tp.shape == (0,) and gt_found.tolist() == [False]
    # A dataset with one empty image and one image with a missed defect: AP 0, recall 0, F 0.
    ranked = rank_detections(
        [truth([], []), truth([[0, 0, 5, 5]], [4])],
        [prediction([[0, 0, 5, 5]], [0.7], [1]), prediction([], [], [])],
        "file_order",
        0.33,
        6,
    )
    assert average_precision_uninterpolated(ranked) == 0.0
    point = operating_point(ranked, 0.5)
    assert (point.true_positives, point.false_positives, point.false_negatives) == (0, 1, 1)
    assert point.f_score == 0.0
    # No ground truth anywhere: AP is 0 by convention, not a division by zero.
    nothing = rank_detections([truth([], [])], [prediction([], [], [])], "voc", 0.5, 6)
    assert average_precision_all_point(nothing) == 0.0 and average_precision_uninterpolated(nothing) == 0.0


# Two images pooled. Image A: one class-0 defect; detections 0.9 on it, 0.85 on empty board.
# Image B: a class-0 and a class-1 defect; detections 0.8 on the class-0 one, 0.7 on the class-1 one.
POOLED_TRUTHS = [truth([[10, 10, 30, 30]], [0]), truth([[100, 100, 120, 120], [200, 200, 220, 240]], [0, 1])]
POOLED_PREDICTIONS = [
    prediction([[10, 10, 30, 30], [400, 400, 420, 420]], [0.9, 0.85], [0, 0]),
    prediction([[100, 100, 120, 120], [200, 200, 220, 240]], [0.8, 0.7], [0, 1]),
]


@pytest.mark.parametrize("rule,iou", [("file_order", 0.33), ("voc", 0.5)])
def test_pooled_ranking_across_images(rule, iou):
    # Ranked over both images: 0.9 TP (A), 0.85 FP (A), 0.8 TP (B), 0.7 TP (B); 3 defects.
    # precision 1/1, 1/2, 2/3, 3/4; recall 1/3, 1/3, 2/3, 3/3.
    ranked = rank_detections(POOLED_TRUTHS, POOLED_PREDICTIONS, rule, iou, 6)
    assert ranked.is_true_positive.tolist() == [True, False, True, True]
    assert ranked.gt_per_class.tolist() == [2, 1, 0, 0, 0, 0]
    precision, recall, scores = precision_recall_curve(ranked)
    np.testing.assert_allclose(precision, [1, 1 / 2, 2 / 3, 3 / 4])
    np.testing.assert_allclose(recall, [1 / 3, 1 / 3, 2 / 3, 1])
    np.testing.assert_allclose(scores, [0.9, 0.85, 0.8, 0.7], rtol=1e-6)
    # Uninterpolated (DeepPCB/ICDAR): (1 + 2/3 + 3/4) / 3 = (29/12) / 3 = 29/36.
    assert average_precision_uninterpolated(ranked) == pytest.approx(29 / 36)
    # All-point (VOC): envelope 1 up to recall 1/3, then 3/4 to recall 1: 1/3 * 1 + 2/3 * 3/4 = 5/6.
    assert average_precision_all_point(ranked) == pytest.approx(5 / 6)
    # Class 0 alone: 0.9 TP, 0.85 FP, 0.8 TP over 2 defects: uninterpolated (1 + 2/3) / 2 = 5/6;
    # all-point 1/2 * 1 + 1/2 * 2/3 = 5/6. Class 1: its one detection is right: 1.
    assert average_precision_uninterpolated(ranked, 0) == pytest.approx(5 / 6)
    assert average_precision_all_point(ranked, 0) == pytest.approx(5 / 6)
    assert average_precision_all_point(ranked, 1) == pytest.approx(1.0)
    # Threshold 0.75 keeps 0.9, 0.85, 0.8: TP 2, FP 1, FN 1 -> P = R = F = 2/3.
    point = operating_point(ranked, 0.75)
    assert (point.true_positives, point.false_positives, point.false_negatives) == (2, 1, 1)
    assert point.precision == pytest.approx(2 / 3) and point.recall == pytest.approx(2 / 3)
    assert point.f_score == pytest.approx(2 / 3)
    # Threshold 0.85 keeps only scores strictly above it, i.e. 0.9: P 1, R 1/3, F = 2 * 1/3 / (4/3) = 0.5.
    # (The float32 score 0.85 is 0.8500000238 but equals the threshold at float32, as the pipeline compares.)
    point = operating_point(ranked, 0.85)
    assert (point.true_positives, point.false_positives, point.false_negatives) == (1, 0, 2)
    assert point.f_score == pytest.approx(0.5)
    # One threshold per image (postprocess judges each by its template): 0.95 on A keeps nothing of it, 0.5
    # on B keeps both of its true positives: TP 2, FP 0, FN 1; per class too (class 0: B's 0.8).
    point = operating_point(ranked, [0.95, 0.5])
    assert (point.true_positives, point.false_positives, point.false_negatives) == (2, 0, 1)
    assert point.score_threshold == [0.5, 0.95]
    assert operating_point(ranked, [0.95, 0.5], class_id=0).true_positives == 1
    assert operating_point(ranked, [0.8, 0.8]).f_score == operating_point(ranked, 0.8).f_score


def test_ties_keep_file_order():
    # Equal scores: image order then detection order decides the rank (stable sort): FP of image A first.
    ranked = rank_detections(
        [truth([], []), truth([[0, 0, 10, 10]], [0])],
        [prediction([[50, 50, 60, 60]], [0.5], [0]), prediction([[0, 0, 10, 10]], [0.5], [0])],
        "file_order",
        0.33,
        6,
    )
    assert ranked.is_true_positive.tolist() == [False, True]
    # Precision at the TP's rank is 1/2 -> AP = (1/2) / 1.
    assert average_precision_uninterpolated(ranked) == pytest.approx(0.5)


def test_summarize_reports_the_hand_computed_figures():
    summary = summarize(POOLED_TRUTHS, POOLED_PREDICTIONS, 0.75, CLASS_NAMES)
    assert (summary["images"], summary["ground_truths"], summary["detections"]) == (2, 3, 4)
    assert summary["deeppcb"]["ap"] == pytest.approx(29 / 36)
    assert summary["deeppcb"]["at_threshold"]["f_score"] == pytest.approx(2 / 3)
    # mAP@0.5 averages only classes with defects: (5/6 + 1) / 2 = 11/12.
    assert summary["voc"]["map50"] == pytest.approx(11 / 12)
    assert summary["per_class"]["open"]["ground_truths"] == 2 and summary["per_class"]["open"]["detections"] == 3
    assert summary["per_class"]["short"]["deeppcb_ap"] == pytest.approx(1.0)
    # No spur defects anywhere: its AP is undefined, reported as None rather than 0.
    assert summary["per_class"]["spur"]["voc_ap50"] is None and summary["per_class"]["spur"]["deeppcb_ap"] is None


def test_regardless_of_class_a_wrong_class_at_the_right_place_counts_but_a_second_box_there_does_not():
    # One open defect; detections: short 0.9 on it, open 0.8 on it, pin-hole 0.6 elsewhere.
    # With classes: 0.9 FP, 0.8 TP, 0.6 FP -> AP = (1/2) / 1. Regardless of class: 0.9 TP, 0.8 FP (the defect is
    # taken), 0.6 FP -> AP = 1 / 1; at 0.7: 1 TP / 1 FP / 0 misses, F = 2/3.
    summary = summarize([truth([[0, 0, 10, 10]], [0])],
                        [prediction([[0, 0, 10, 10], [0, 0, 10, 10], [50, 50, 60, 60]], [0.9, 0.8, 0.6], [1, 0, 5])],
                        0.7, CLASS_NAMES)
    assert summary["deeppcb"]["ap"] == pytest.approx(0.5)
    located = summary["deeppcb_regardless_of_class"]
    assert located["ap"] == pytest.approx(1.0)
    at = located["at_threshold"]
    assert (at["true_positives"], at["false_positives"], at["false_negatives"]) == (1, 1, 0)
    assert at["f_score"] == pytest.approx(2 / 3)


def test_mismatched_lengths_and_unknown_rule_are_refused():
    with pytest.raises(ValueError, match="2 ground truths but 1 predictions"):
        rank_detections(POOLED_TRUTHS, POOLED_PREDICTIONS[:1], "voc", 0.5, 6)
    with pytest.raises(ValueError, match="unknown matching rule"):
        rank_detections(POOLED_TRUTHS, POOLED_PREDICTIONS, "coco", 0.5, 6)
