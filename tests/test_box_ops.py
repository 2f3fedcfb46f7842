"""postprocess array code (models/postprocess/1/box_ops.py, thresholds.py): decoding, NMS, mapping, padding."""
from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

from tests.array_backends import ARRAY_MODULES, to_numpy
from tools.pipeline_math import box_ops, load_model_module, postprocess_batch, served_settings

thresholds = load_model_module("postprocess", "thresholds")
NUM_CLASSES = 6


def greedy_nms(boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, iou_threshold: float) -> list[int]:
    """Reference: textbook greedy class-aware NMS, one box at a time; kept indices by descending score."""
    kept: list[int] = []
    for i in np.argsort(-scores, kind="stable"):
        if all(classes[j] != classes[i] or iou(boxes[i], boxes[j]) <= iou_threshold for j in kept):
            kept.append(int(i))
    return kept


def iou(a: np.ndarray, b: np.ndarray) -> float:
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    intersection = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - intersection
    return intersection / union if union > 0 else 0.0


def clustered_boxes(rng: np.random.Generator, count: int, num_classes: int):
    """Boxes crowded around a few centres (long suppression chains), random scores and classes."""
    centres = rng.uniform(50, 450, (5, 2))
    centre = centres[rng.integers(0, len(centres), count)] + rng.normal(0, 6, (count, 2))
    size = rng.uniform(20, 50, (count, 2))
    boxes = np.concatenate([centre - size / 2, centre + size / 2], axis=1).astype(np.float32)
    return boxes, rng.random(count).astype(np.float32), rng.integers(0, num_classes, count)


def run_cluster_nms(xp, boxes, scores, classes, iou_threshold) -> list[int]:
    order = np.argsort(-scores, kind="stable")
    keep = box_ops.cluster_nms(xp.asarray(boxes[order]), xp.asarray(classes[order]), iou_threshold, xp)
    return order[to_numpy(keep)].tolist()


# --- box decoding and IoU -------------------------------------------------------------------------


@pytest.mark.parametrize("xp", ARRAY_MODULES)
def test_centre_size_boxes_become_corners(xp):
    boxes = xp.asarray([[50, 40, 20, 10], [0, 0, 4, 6]], dtype=xp.float32)
    np.testing.assert_array_equal(to_numpy(box_ops.cxcywh_to_xyxy(boxes, xp)), [[40, 35, 60, 45], [-2, -3, 2, 3]])


@pytest.mark.parametrize("xp", ARRAY_MODULES)
def test_pairwise_iou_known_values(xp):
    boxes = xp.asarray([[0, 0, 10, 10], [0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30], [3, 3, 3, 8]], xp.float32)
    result = to_numpy(box_ops.pairwise_iou(boxes, xp))
    assert result[0, 1] == pytest.approx(1.0)
    assert result[0, 2] == pytest.approx(50 / 150)
    assert result[0, 3] == 0
    assert result[4, 4] == 0  # zero-area box: empty union, no NaN
    np.testing.assert_allclose(result, result.T)


# --- NMS ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("xp", ARRAY_MODULES)
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("iou_threshold", [0.3, 0.5, 0.7])
def test_cluster_nms_equals_greedy_nms(xp, seed, iou_threshold):
    boxes, scores, classes = clustered_boxes(np.random.default_rng(seed), 300, NUM_CLASSES)
    assert run_cluster_nms(xp, boxes, scores, classes, iou_threshold) == greedy_nms(boxes, scores, classes, iou_threshold)


@pytest.mark.parametrize("xp", ARRAY_MODULES)
@pytest.mark.parametrize("seed", range(4))
def test_cluster_nms_agrees_with_opencv_batched_nms(xp, seed):
    boxes, scores, classes = clustered_boxes(np.random.default_rng(100 + seed), 250, NUM_CLASSES)
    xywh = [[float(x1), float(y1), float(x2 - x1), float(y2 - y1)] for x1, y1, x2, y2 in boxes]
    opencv = cv2.dnn.NMSBoxesBatched(xywh, scores.tolist(), classes.tolist(), 0.0, 0.45)
    assert run_cluster_nms(xp, boxes, scores, classes, 0.45) == np.asarray(opencv).reshape(-1).tolist()


@pytest.mark.parametrize("xp", ARRAY_MODULES)
def test_nms_is_class_aware(xp):
    boxes = np.array([[0, 0, 10, 10], [1, 0, 11, 10], [0, 1, 10, 11]], np.float32)
    scores = np.array([0.9, 0.8, 0.7], np.float32)
    assert run_cluster_nms(xp, boxes, scores, np.array([0, 1, 0]), 0.5) == [0, 1]
    assert run_cluster_nms(xp, boxes, scores, np.array([0, 0, 0]), 0.5) == [0]


@pytest.mark.parametrize("xp", ARRAY_MODULES)
def test_suppressed_box_does_not_suppress(xp):
    """A chain: b suppressed by a must not suppress c (where one-shot matrix NMS would go wrong)."""
    boxes = np.array([[0, 0, 10, 10], [6, 0, 16, 10], [12, 0, 22, 10]], np.float32)  # a-b and b-c overlap, a-c not
    scores = np.array([0.9, 0.8, 0.7], np.float32)
    assert run_cluster_nms(xp, boxes, scores, np.zeros(3, int), 0.2) == [0, 2]


# --- whole postprocess ----------------------------------------------------------------------------


def prediction(boxes_cxcywh, class_scores, num_anchors: int = 50) -> np.ndarray:
    """A (4 + NUM_CLASSES, num_anchors) detector output: the given anchors first, the rest scoring zero."""
    pred = np.zeros((4 + NUM_CLASSES, num_anchors), np.float32)
    pred[:4, : len(boxes_cxcywh)] = np.asarray(boxes_cxcywh, np.float32).T
    pred[:4, len(boxes_cxcywh) :] = [[320], [320], [10], [10]]
    pred[4:, : len(class_scores)] = np.asarray(class_scores, np.float32).T
    return pred


def one_hot_scores(pairs) -> list[list[float]]:
    rows = []
    for class_id, score in pairs:
        row = [0.0] * NUM_CLASSES
        row[class_id] = score
        rows.append(row)
    return rows


@pytest.mark.parametrize("xp", ARRAY_MODULES)
def test_boxes_map_back_to_original_pixels_and_clip(xp):
    # a 1280 x 480 image letterboxed into 640 x 640: scale 0.5, pad_y 200
    geometry = np.array([0.5, 0, 200, 1280, 480], np.float32)
    pred = prediction([[120, 270, 40, 40], [630, 230, 40, 80], [300, 500, 20, 20]],
                      one_hot_scores([(2, 0.9), (4, 0.8), (1, 0.7)]))
    count, boxes, scores, classes = box_ops.postprocess_image(xp.asarray(pred), xp.asarray(geometry), 0.25, 0.45, 100, 1000, xp)
    assert count == 3
    # inside; crossing the right and top edges; wholly in the bottom padding (collapses onto the edge)
    np.testing.assert_allclose(to_numpy(boxes)[:3], [[200, 100, 280, 180], [1220, 0, 1280, 140], [580, 480, 620, 480]])
    np.testing.assert_allclose(to_numpy(scores)[:3], [0.9, 0.8, 0.7])
    np.testing.assert_array_equal(to_numpy(classes)[:3], [2, 4, 1])


@pytest.mark.parametrize("xp", ARRAY_MODULES)
def test_score_threshold_is_strict_and_best_class_wins(xp):
    pred = prediction([[100, 100, 20, 20], [300, 300, 20, 20], [500, 500, 20, 20]],
                      [[0.1, 0.6, 0.2, 0, 0, 0], [0.25, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0.3, 0.31]])
    geometry = xp.asarray([1, 0, 0, 640, 640], xp.float32)
    count, _, scores, classes = box_ops.postprocess_image(xp.asarray(pred), geometry, 0.25, 0.45, 100, 1000, xp)
    assert count == 2
    np.testing.assert_allclose(to_numpy(scores)[:2], [0.6, 0.31])
    np.testing.assert_array_equal(to_numpy(classes)[:2], [1, 5])


@pytest.mark.parametrize("xp", ARRAY_MODULES)
def test_top_k_and_max_detections_cap_and_rows_past_the_count_are_zero(xp):
    centres = [[40 + 60 * i, 40, 20, 20] for i in range(10)]  # ten disjoint boxes
    pred = prediction(centres, one_hot_scores([(i % NUM_CLASSES, 0.5 + i / 100) for i in range(10)]))
    geometry = xp.asarray([1, 0, 0, 640, 640], xp.float32)

    count, boxes, scores, classes = box_ops.postprocess_image(xp.asarray(pred), geometry, 0.25, 0.45, 100, 3, xp)
    assert count == 3
    np.testing.assert_allclose(to_numpy(scores)[:3], [0.59, 0.58, 0.57])

    count, boxes, scores, classes = box_ops.postprocess_image(xp.asarray(pred), geometry, 0.25, 0.45, 4, 1000, xp)
    assert count == 4 and to_numpy(boxes).shape == (4, 4)

    count, boxes, scores, classes = box_ops.postprocess_image(xp.asarray(pred), geometry, 0.25, 0.45, 20, 1000, xp)
    assert count == 10
    boxes, scores, classes = to_numpy(boxes), to_numpy(scores), to_numpy(classes)
    assert boxes.dtype == np.float32 and scores.dtype == np.float32 and classes.dtype == np.int32
    assert not boxes[10:].any() and not scores[10:].any() and not classes[10:].any()


@pytest.mark.parametrize("xp", ARRAY_MODULES)
def test_batch_outputs_follow_the_efficient_nms_layout(xp):
    rng = np.random.default_rng(3)
    pred = np.zeros((3, 4 + NUM_CLASSES, 8400), np.float32)
    pred[:, :2] = rng.uniform(0, 640, (3, 2, 8400))
    pred[:, 2:4] = rng.uniform(5, 60, (3, 2, 8400))
    pred[:2, 4:] = rng.random((2, NUM_CLASSES, 8400)) ** 8  # the third image has no candidate at all
    geometry = np.array([[1, 0, 0, 640, 640], [0.5, 0, 200, 1280, 480], [2, 0, 0, 320, 320]], np.float32)

    num, boxes, scores, classes = (to_numpy(a) for a in box_ops.postprocess_batch(
        xp.asarray(pred), xp.asarray(geometry), 0.25, 0.45, 100, 1000, xp))
    assert num.shape == (3, 1) and num.dtype == np.int32
    assert boxes.shape == (3, 100, 4) and scores.shape == (3, 100) and classes.shape == (3, 100)
    assert num[2, 0] == 0 and not boxes[2].any()
    for i in range(3):
        count = num[i, 0]
        assert (np.diff(scores[i, :count]) <= 0).all()
        assert (boxes[i, :count, 2] <= geometry[i, 3]).all() and (boxes[i, :count, 3] <= geometry[i, 4]).all()
        assert (boxes[i, :count] >= 0).all()
        assert ((classes[i, :count] >= 0) & (classes[i, :count] < NUM_CLASSES)).all()


def test_served_defaults_fill_in_unset_arguments():
    settings = served_settings()
    pred = prediction([[100, 100, 20, 20], [300, 300, 20, 20]], one_hot_scores([(0, settings.score_threshold + 0.01), (3, 0.99)]))
    geometry = np.array([[1, 0, 0, 640, 640]], np.float32)
    num, boxes, _, _ = postprocess_batch(pred[None], geometry)
    assert num[0, 0] == 2 and boxes.shape == (1, settings.max_detections, 4)
    num, _, _, _ = postprocess_batch(pred[None], geometry, score_threshold=settings.score_threshold + 0.02)
    assert num[0, 0] == 1


# --- threshold request parameters -----------------------------------------------------------------


@pytest.mark.parametrize("value,expected", [(0.3, 0.3), (0, 0.0), (1, 1.0), ("0.45", 0.45), (" 0.5 ", 0.5)])
def test_threshold_values_accepted(value, expected):
    assert thresholds.parse_threshold("score_threshold", value) == expected


@pytest.mark.parametrize("value", [1.5, -0.1, "high", "", True, None, math.nan, math.inf, "nan", [0.3]])
def test_threshold_values_rejected_with_the_parameter_named(value):
    with pytest.raises(ValueError, match=r"parameter 'iou_threshold' must be a number between 0 and 1, got "):
        thresholds.parse_threshold("iou_threshold", value)


def test_request_overrides_only_what_it_sets():
    defaults = {"score_threshold": 0.25, "iou_threshold": 0.45}
    assert thresholds.resolve_thresholds({}, defaults) == defaults
    assert thresholds.resolve_thresholds({"iou_threshold": 0.6, "unrelated": "x"}, defaults) == {
        "score_threshold": 0.25, "iou_threshold": 0.6}
    with pytest.raises(ValueError, match="score_threshold"):
        thresholds.resolve_thresholds({"score_threshold": "abc"}, defaults)
