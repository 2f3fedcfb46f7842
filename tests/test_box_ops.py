"""postprocess array code (models/postprocess/1/box_ops.py, thresholds.py): decoding, NMS, mapping, padding."""
from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

from tests.array_backends import ARRAY_MODULES, to_numpy
from tools.contract import MODELS_ROOT, served_contract
from tools.pipeline_math import box_ops, load_model_module, postprocess_as_served, preprocess_as_served

thresholds = load_model_module("postprocess", "thresholds")
NUM_CLASSES = 6
# CPU instances run postprocess_batch_opencv, GPU instances the array code (its CuPy variant runs on a GPU
# machine); both must give the same detections.
POSTPROCESS_PATHS = [
    *(pytest.param(("array", param.values[0]), id=f"array-{param.id}", marks=param.marks) for param in ARRAY_MODULES),
    pytest.param(("opencv", np), id="opencv"),
]


def run_postprocess(path, pred, geometry, score_threshold, iou_threshold, max_detections=100, pre_nms_top_k=1000):
    """(num, boxes, scores, classes) as NumPy arrays from one postprocess implementation (POSTPROCESS_PATHS)."""
    kind, xp = path
    if kind == "opencv":
        outputs = box_ops.postprocess_batch_opencv(pred, geometry, score_threshold, iou_threshold, max_detections,
                                                   pre_nms_top_k)
    else:
        outputs = box_ops.postprocess_batch(xp.asarray(pred), xp.asarray(geometry), score_threshold, iou_threshold,
                                            max_detections, pre_nms_top_k, xp)
    return tuple(to_numpy(output) for output in outputs)


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


@pytest.mark.parametrize("path", POSTPROCESS_PATHS)
def test_boxes_map_back_to_original_pixels_and_clip(path):
    # a 1280 x 480 image letterboxed into 640 x 640: scale 0.5, pad_y 200
    geometry = np.array([[0.5, 0, 200, 1280, 480]], np.float32)
    pred = prediction([[120, 270, 40, 40], [630, 230, 40, 80], [300, 500, 20, 20]],
                      one_hot_scores([(2, 0.9), (4, 0.8), (1, 0.7)]))
    num, boxes, scores, classes = run_postprocess(path, pred[None], geometry, 0.25, 0.45)
    assert num[0, 0] == 3
    # inside; crossing the right and top edges; wholly in the bottom padding (collapses onto the edge)
    np.testing.assert_allclose(boxes[0, :3], [[200, 100, 280, 180], [1220, 0, 1280, 140], [580, 480, 620, 480]])
    np.testing.assert_allclose(scores[0, :3], [0.9, 0.8, 0.7])
    np.testing.assert_array_equal(classes[0, :3], [2, 4, 1])


@pytest.mark.parametrize("path", POSTPROCESS_PATHS)
def test_score_threshold_is_strict_and_every_class_above_it_is_a_candidate(path):
    pred = prediction([[100, 100, 20, 20], [300, 300, 20, 20], [500, 500, 20, 20]],
                      [[0.1, 0.6, 0.2, 0, 0, 0], [0.25, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0.3, 0.31]])
    geometry = np.array([[1, 0, 0, 640, 640]], np.float32)
    num, boxes, scores, classes = run_postprocess(path, pred[None], geometry, 0.25, 0.45)
    # the third anchor is torn between two classes: both readings survive class-aware NMS, one box each
    assert num[0, 0] == 3
    np.testing.assert_allclose(scores[0, :3], [0.6, 0.31, 0.3])
    np.testing.assert_array_equal(classes[0, :3], [1, 5, 4])
    np.testing.assert_array_equal(boxes[0, 1], boxes[0, 2])


@pytest.mark.parametrize("path", POSTPROCESS_PATHS)
def test_equal_scores_rank_by_anchor_then_class(path):
    pred = prediction([[100, 100, 20, 20], [300, 300, 20, 20]], [[0, 0, 0.5, 0.5, 0, 0], [0.5, 0, 0, 0, 0, 0]])
    geometry = np.array([[1, 0, 0, 640, 640]], np.float32)
    num, boxes, _, classes = run_postprocess(path, pred[None], geometry, 0.25, 0.45, pre_nms_top_k=2)
    assert num[0, 0] == 2
    np.testing.assert_array_equal(classes[0, :2], [2, 3])
    np.testing.assert_allclose(boxes[0, :2, 0], [90, 90])


@pytest.mark.parametrize("path", POSTPROCESS_PATHS)
def test_top_k_and_max_detections_cap_and_rows_past_the_count_are_zero(path):
    centres = [[40 + 60 * i, 40, 20, 20] for i in range(10)]  # ten disjoint boxes
    pred = prediction(centres, one_hot_scores([(i % NUM_CLASSES, 0.5 + i / 100) for i in range(10)]))[None]
    geometry = np.array([[1, 0, 0, 640, 640]], np.float32)

    num, boxes, scores, classes = run_postprocess(path, pred, geometry, 0.25, 0.45, 100, 3)
    assert num[0, 0] == 3
    np.testing.assert_allclose(scores[0, :3], [0.59, 0.58, 0.57])

    num, boxes, scores, classes = run_postprocess(path, pred, geometry, 0.25, 0.45, 4, 1000)
    assert num[0, 0] == 4 and boxes.shape == (1, 4, 4)

    num, boxes, scores, classes = run_postprocess(path, pred, geometry, 0.25, 0.45, 20, 1000)
    assert num[0, 0] == 10
    assert boxes.dtype == np.float32 and scores.dtype == np.float32 and classes.dtype == np.int32
    assert not boxes[0, 10:].any() and not scores[0, 10:].any() and not classes[0, 10:].any()


@pytest.mark.parametrize("path", POSTPROCESS_PATHS)
def test_batch_outputs_follow_the_efficient_nms_layout(path):
    rng = np.random.default_rng(3)
    pred = np.zeros((3, 4 + NUM_CLASSES, 8400), np.float32)
    pred[:, :2] = rng.uniform(0, 640, (3, 2, 8400))
    pred[:, 2:4] = rng.uniform(5, 60, (3, 2, 8400))
    pred[:2, 4:] = rng.random((2, NUM_CLASSES, 8400)) ** 8  # the third image has no candidate at all
    geometry = np.array([[1, 0, 0, 640, 640], [0.5, 0, 200, 1280, 480], [2, 0, 0, 320, 320]], np.float32)

    num, boxes, scores, classes = run_postprocess(path, pred, geometry, 0.25, 0.45)
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
    contract = served_contract()
    pred = prediction([[100, 100, 20, 20], [300, 300, 20, 20]], one_hot_scores([(0, contract.score_threshold + 0.01), (3, 0.99)]))
    geometry = np.array([[1, 0, 0, 640, 640]], np.float32)
    num, boxes, _, _ = postprocess_as_served(pred[None], geometry)
    assert num[0, 0] == 2 and boxes.shape == (1, contract.max_detections, 4)
    num, _, _, _ = postprocess_as_served(pred[None], geometry, score_threshold=contract.score_threshold + 0.02)
    assert num[0, 0] == 1


def test_an_image_whose_template_registered_is_judged_at_the_template_threshold():
    contract = served_contract()
    low, high = sorted([contract.score_threshold, contract.template_score_threshold])
    assert low < high, "the deployed thresholds are the same: this test needs them apart"
    between = (low + high) / 2
    pred = prediction([[100, 100, 20, 20], [300, 300, 20, 20]], one_hot_scores([(0, between), (3, 0.99)]))
    batch, geometry = np.stack([pred, pred]), np.array([[1, 0, 0, 640, 640]] * 2, np.float32)
    registration = np.array([[0, 0, 0, 0], [1.5, -2, 0.1, 0.97]], np.float32)  # without, with a template
    num, _, _, _ = postprocess_as_served(batch, geometry, registration=registration)
    kept_between = [contract.deployed_score_threshold(row) < between for row in registration]
    assert num[:, 0].tolist() == [1 + kept for kept in kept_between]
    assert kept_between == [contract.score_threshold < between, contract.template_score_threshold < between]
    # a request's own threshold wins over both
    num, _, _, _ = postprocess_as_served(batch, geometry, registration=registration, score_threshold=high + 0.01)
    assert num[:, 0].tolist() == [1, 1]


# --- the CPU path (OpenCV NMS) against the array path ---------------------------------------------


def random_predictions(rng: np.random.Generator, batch: int, num_anchors: int) -> np.ndarray:
    """Detector outputs with crowded boxes (long suppression chains), some reaching past the input's edges,
    and best scores that never tie (so both paths must rank every candidate the same way)."""
    pred = np.zeros((batch, 4 + NUM_CLASSES, num_anchors), np.float32)
    centres = rng.uniform(-20, 660, (batch, 8, 2))
    pick = rng.integers(0, 8, (batch, num_anchors))
    pred[:, :2] = np.take_along_axis(centres, pick[..., None], axis=1).transpose(0, 2, 1)
    pred[:, :2] += rng.normal(0, 8, (batch, 2, num_anchors))
    pred[:, 2:4] = rng.uniform(8, 60, (batch, 2, num_anchors))
    best = (rng.permuted(np.tile(np.arange(num_anchors), (batch, 1)), axis=1) + 1) / (num_anchors + 1)
    pred[:, 4:] = rng.random((batch, NUM_CLASSES, num_anchors)) * best[:, None]  # below the best class
    pred[np.arange(batch)[:, None], 4 + rng.integers(0, NUM_CLASSES, (batch, num_anchors)), np.arange(num_anchors)] = best
    return pred


def assert_same_detections(opencv, array) -> None:
    """Bit for bit: both paths rank, suppress, cap and map back the same candidates with the same float32 ops."""
    for name, got, expected in zip(("num", "boxes", "scores", "classes"), opencv, array):
        assert got.dtype == expected.dtype and got.shape == expected.shape, name
        np.testing.assert_array_equal(got, expected, err_msg=name)


@pytest.mark.parametrize("xp", ARRAY_MODULES)
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("score_threshold,iou_threshold,pre_nms_top_k,max_detections", [
    (0.25, 0.45, 1000, 1000), (0.001, 0.3, 1000, 1000), (0.0, 0.7, 300, 1000),  # every kept box compared
    (0.25, 0.45, 1000, 100), (0.05, 0.45, 1000, 20)])  # capped at K
def test_opencv_postprocess_equals_the_array_postprocess(xp, seed, score_threshold, iou_threshold, pre_nms_top_k,
                                                          max_detections):
    pred = random_predictions(np.random.default_rng(seed), 3, 2000)
    geometry = np.array([[1, 0, 0, 640, 640], [0.5, 0, 200, 1280, 480], [1.6, 0, 64, 400, 320]], np.float32)
    settings = (score_threshold, iou_threshold, max_detections, pre_nms_top_k)
    assert_same_detections(run_postprocess(("opencv", np), pred, geometry, *settings),
                           run_postprocess(("array", xp), pred, geometry, *settings))


@pytest.mark.parametrize("xp", ARRAY_MODULES)
@pytest.mark.parametrize("pre_nms_top_k", [1, 50, 300])
def test_opencv_postprocess_equals_the_array_postprocess_when_scores_tie(xp, pre_nms_top_k):
    """Scores on a coarse grid tie by the hundred, across anchors and classes and at the top-k cut: both
    paths must break every tie the same way (anchor, then class)."""
    pred = random_predictions(np.random.default_rng(11), 2, 1500)
    pred[:, 4:] = np.round(pred[:, 4:] * 20) / 20
    geometry = np.array([[1, 0, 0, 640, 640], [0.5, 0, 200, 1280, 480]], np.float32)
    settings = (0.1, 0.45, 1000, pre_nms_top_k)
    assert_same_detections(run_postprocess(("opencv", np), pred, geometry, *settings),
                           run_postprocess(("array", xp), pred, geometry, *settings))


@pytest.mark.parametrize("path", POSTPROCESS_PATHS)
def test_each_image_takes_its_own_thresholds(path):
    """A dynamic batch mixes requests with different thresholds: each image gets its own, as if alone."""
    pred = random_predictions(np.random.default_rng(7), 4, 1500)
    geometry = np.tile(np.array([1, 0, 0, 640, 640], np.float32), (4, 1))
    score_thresholds, iou_thresholds = [0.9, 0.001, 0.5, 0.9], [0.45, 0.3, 0.7, 0.6]
    batched = run_postprocess(path, pred, geometry, score_thresholds, iou_thresholds)
    for i in range(4):
        alone = run_postprocess(path, pred[i : i + 1], geometry[i : i + 1], score_thresholds[i], iou_thresholds[i])
        assert_same_detections(tuple(output[i : i + 1] for output in batched), alone)


def test_opencv_nms_keeps_classes_apart_whatever_the_coordinates():
    """NMSBoxesBatched offsets class c by c * (largest coordinate + 1): without first moving the boxes to
    non-negative coordinates, a class-1 box at (-41, -41) would land on a class-0 box in the far corner."""
    boxes = np.array([[600, 600, 640, 640], [-41, -41, -1, -1]], np.float32)
    kept = box_ops.class_aware_nms_opencv(boxes, np.array([0.9, 0.8], np.float32), np.array([0, 1]), 0.45)
    assert sorted(kept.tolist()) == [0, 1]


@pytest.fixture(scope="module")
def detector_outputs(synthetic_boards):
    """Real detector outputs (1/model.onnx on ONNX Runtime) for synthetic boards, whole and cropped to letterbox."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(MODELS_ROOT / "pcb_defect_detector" / "1" / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    images = [cv2.imread(str(sample.image_path), cv2.IMREAD_GRAYSCALE) for sample in synthetic_boards]
    images += [images[0][:, :400], images[1][300:]]
    tensors, geometries, _ = zip(*(preprocess_as_served(cv2.imencode(".png", image)[1].tobytes()) for image in images))
    (pred,) = session.run(None, {session.get_inputs()[0].name: np.stack(tensors)})
    return pred, np.stack(geometries)


@pytest.mark.parametrize("xp", ARRAY_MODULES)
@pytest.mark.parametrize("score_threshold", [0.55, 0.01, 0.001])
def test_opencv_postprocess_equals_the_array_postprocess_on_detector_outputs(xp, detector_outputs, score_threshold):
    pred, geometry = detector_outputs
    opencv = run_postprocess(("opencv", np), pred, geometry, score_threshold, 0.45)
    assert_same_detections(opencv, run_postprocess(("array", xp), pred, geometry, score_threshold, 0.45))
    assert opencv[0].min() > 0  # every board has detections, so NMS and the mapping were exercised


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
