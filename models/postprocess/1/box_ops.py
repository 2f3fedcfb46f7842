"""Detector output -> final detections (EfficientNMS layout).

Per image: every (anchor, class) pair scoring above the threshold (strictly greater) is a candidate, as in
TensorRT's EfficientNMS, then pre-NMS top-k by score (ties: anchor, then class order), class-aware NMS, at most
K detections, boxes mapped back to original pixels and clipped, zero rows past the count. An anchor may so
propose two classes where the detector is torn between them (open or mousebite): the lower-scored reading
still counts where the higher is wrong, which keeping only the best class per anchor throws away.

Two implementations with the same results: ``postprocess_batch_opencv`` for CPU instances (the whole batch
in a few NumPy operations and OpenCV's greedy NMS, no n x n matrix), and array code written once for NumPy
and CuPy (``xp``) for GPU instances (``postprocess_batch``, cluster NMS as matrix operations).
"""
from __future__ import annotations

import numbers
from collections.abc import Sequence

import cv2
import numpy as np

BOX_ROWS = 4  # cx, cy, w, h; one score row per class follows


def cxcywh_to_xyxy(boxes, xp):
    """(..., 4) centre/size boxes -> (..., 4) corner boxes x1, y1, x2, y2."""
    centre, half_size = boxes[..., :2], boxes[..., 2:] / 2
    return xp.concatenate([centre - half_size, centre + half_size], axis=-1)


def pairwise_iou(boxes, xp):
    """(n, 4) x1y1x2y2 boxes -> (n, n) intersection over union (0 where the union is empty)."""
    top_left = xp.maximum(boxes[:, None, :2], boxes[None, :, :2])
    bottom_right = xp.minimum(boxes[:, None, 2:], boxes[None, :, 2:])
    intersection = xp.clip(bottom_right - top_left, 0, None).prod(axis=2)
    area = xp.clip(boxes[:, 2:] - boxes[:, :2], 0, None).prod(axis=1)
    union = area[:, None] + area[None, :] - intersection
    return xp.where(union > 0, intersection / xp.where(union > 0, union, 1), 0)


def cluster_nms(sorted_boxes, sorted_classes, iou_threshold: float, xp):
    """Class-aware NMS of boxes sorted by descending score; returns the boolean keep mask.

    Cluster-NMS: a box is kept when no kept, higher-scored box of its class overlaps it by more than
    ``iou_threshold``. Iterating that rule from "all kept" fixes one more leading box per round, so it
    reaches exactly greedy NMS's answer in at most n rounds (usually a handful), each round one matrix op.
    """
    count = sorted_boxes.shape[0]
    same_class = sorted_classes[:, None] == sorted_classes[None, :]
    # suppressor i (row) outranks victim j (column) only above the diagonal
    overlaps = xp.triu(pairwise_iou(sorted_boxes, xp) * same_class, k=1) > iou_threshold
    keep = xp.ones(count, dtype=bool)
    for _ in range(count):
        next_keep = ~(overlaps & keep[:, None]).any(axis=0)
        if bool((next_keep == keep).all()):
            break
        keep = next_keep
    return keep


def postprocess_image(pred, geometry, score_threshold: float, iou_threshold: float, max_detections: int,
                      pre_nms_top_k: int, xp=np):
    """One image: pred (4 + num_classes, N) with cx, cy, w, h in input pixels then class scores;
    geometry (5,) = scale, pad_x, pad_y, orig_width, orig_height.

    Returns (count, boxes (K, 4) float32 x1y1x2y2 in original pixels, scores (K,) float32, classes (K,) int32)
    with K = max_detections and zeros past ``count``.
    """
    num_classes = pred.shape[0] - BOX_ROWS
    pair_scores = pred[BOX_ROWS:].T.reshape(-1)  # (anchor, class) pairs, anchor-major
    candidates = xp.nonzero(pair_scores > score_threshold)[0]
    ranked = candidates[xp.argsort(-pair_scores[candidates], kind="stable")[:pre_nms_top_k]]
    anchor, pair_class = ranked // num_classes, (ranked % num_classes).astype(xp.int32)
    boxes = cxcywh_to_xyxy(pred[:BOX_ROWS, anchor].T, xp)
    keep = cluster_nms(boxes, pair_class, iou_threshold, xp)
    kept = xp.nonzero(keep)[0][:max_detections]
    count = int(kept.size)

    scale, pad_x, pad_y, orig_width, orig_height = (geometry[i] for i in range(5))
    pad = xp.stack([pad_x, pad_y, pad_x, pad_y])
    limit = xp.stack([orig_width, orig_height, orig_width, orig_height])
    original_boxes = xp.clip((boxes[kept] - pad) / scale, 0, limit)

    out_boxes = xp.zeros((max_detections, 4), dtype=xp.float32)
    out_scores = xp.zeros(max_detections, dtype=xp.float32)
    out_classes = xp.zeros(max_detections, dtype=xp.int32)
    out_boxes[:count] = original_boxes
    out_scores[:count] = pair_scores[ranked[kept]]
    out_classes[:count] = pair_class[kept]
    return count, out_boxes, out_scores, out_classes


def per_image(threshold: float | Sequence[float], batch: int) -> list[float]:
    """One threshold per image: a single value repeated, or the given per-image values."""
    values = [float(threshold)] * batch if isinstance(threshold, numbers.Real) else [float(t) for t in threshold]
    if len(values) != batch:
        raise ValueError(f"{len(values)} thresholds for a batch of {batch} images")
    return values


def postprocess_batch(pred, geometry, score_threshold: float | Sequence[float],
                      iou_threshold: float | Sequence[float], max_detections: int, pre_nms_top_k: int, xp=np):
    """A batch: pred (B, 4 + num_classes, N), geometry (B, 5); each threshold one value or one per image.

    Returns (num_detections (B, 1) int32, boxes (B, K, 4) float32, scores (B, K) float32, classes (B, K) int32).
    """
    batch = pred.shape[0]
    results = [
        postprocess_image(pred[i], geometry[i], score, iou, max_detections, pre_nms_top_k, xp)
        for i, score, iou in zip(range(batch), per_image(score_threshold, batch), per_image(iou_threshold, batch))
    ]
    counts, boxes, scores, classes = zip(*results)
    return (
        xp.asarray(counts, dtype=xp.int32).reshape(-1, 1),
        xp.stack(boxes),
        xp.stack(scores),
        xp.stack(classes),
    )


def rank_within_image(image: np.ndarray) -> np.ndarray:
    """For rows sorted by image index: each row's position among its image's rows (0, 1, ...)."""
    return np.arange(image.size) - np.searchsorted(image, image, side="left")


def within_top_k_scores(image: np.ndarray, scores: np.ndarray, batch: int, top_k: int) -> np.ndarray:
    """For rows grouped by image: the rows scoring at least their image's k-th best score (every tie at that
    bound kept), so that a stable sort of only these cuts at k exactly where sorting all rows would; at low
    thresholds an image has tens of thousands of (anchor, class) pairs, and sorting them all is slow."""
    keep = np.ones(image.size, dtype=bool)
    bounds = np.searchsorted(image, np.arange(batch + 1))
    for first, last in zip(bounds[:-1], bounds[1:]):
        surplus = last - first - top_k
        if surplus > 0 and top_k > 0:
            kth_best = np.partition(scores[first:last], surplus)[surplus]
            keep[first:last] = scores[first:last] >= kth_best
    return np.flatnonzero(keep)


def class_aware_nms_opencv(boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy class-aware NMS (cv2.dnn.NMSBoxesBatched) of (n, 4) x1y1x2y2 boxes; kept indices, any order.

    OpenCV separates the classes by shifting each box by ``class * (largest coordinate + 1)``, which keeps
    them apart only when no coordinate is negative, so the boxes are first moved (IoU does not change).
    Every candidate here is already above its request's score threshold (>= 0), so OpenCV's own score
    filter, given 0, lets them all through.
    """
    corners = boxes.astype(np.float64)
    corners -= corners.min(initial=0.0)
    xywh = np.concatenate([corners[:, :2], corners[:, 2:] - corners[:, :2]], axis=1)  # OpenCV's Rect2d
    kept = cv2.dnn.NMSBoxesBatched(xywh, scores, classes.astype(np.int32), 0.0, iou_threshold)
    return np.asarray(kept, dtype=np.intp).reshape(-1)  # () when nothing is kept


def postprocess_batch_opencv(pred: np.ndarray, geometry: np.ndarray, score_threshold: float | Sequence[float],
                             iou_threshold: float | Sequence[float], max_detections: int, pre_nms_top_k: int):
    """``postprocess_batch`` for CPU instances: the same inputs and outputs, the whole batch at once.

    Candidate pairs of every image are thresholded, ranked (by image, then descending score, ties by anchor
    then class as in ``postprocess_image``), capped and mapped back together; only NMS runs image by image.
    """
    batch = pred.shape[0]
    # float32 like the array code, where NumPy compares a Python float with float32 scores in float32
    score_thresholds = np.asarray(per_image(score_threshold, batch), dtype=np.float32)
    iou_thresholds = per_image(iou_threshold, batch)
    pair_scores = pred[:, BOX_ROWS:].transpose(0, 2, 1)  # (B, N, num_classes): pairs by image, anchor, class

    # flat indices: multi-dimensional nonzero is several times slower
    image, anchor, classes = np.unravel_index(np.flatnonzero(pair_scores > score_thresholds[:, None, None]),
                                              pair_scores.shape)
    scores = pair_scores[image, anchor, classes]
    contenders = within_top_k_scores(image, scores, batch, pre_nms_top_k)
    # stable: equal scores stay in anchor, then class order
    ranked = contenders[np.lexsort((-scores[contenders], image[contenders]))]
    ranked = ranked[rank_within_image(image[ranked]) < pre_nms_top_k]
    image, anchor, classes, scores = image[ranked], anchor[ranked], classes[ranked].astype(np.int32), scores[ranked]
    boxes = cxcywh_to_xyxy(pred[image, :BOX_ROWS, anchor], np)

    keep = np.zeros(image.size, dtype=bool)
    # One NMS call per image: OpenCV tests each candidate against every box kept so far in the call, so
    # a call spanning images would cost the batch size squared.
    bounds = np.searchsorted(image, np.arange(batch + 1))
    for index, (first, last) in enumerate(zip(bounds[:-1], bounds[1:])):
        if first < last:
            kept_here = class_aware_nms_opencv(boxes[first:last], scores[first:last], classes[first:last],
                                               iou_thresholds[index])
            keep[first + kept_here] = True
    kept = np.flatnonzero(keep)  # still by image, then descending score
    rank = rank_within_image(image[kept])
    kept, rank = kept[rank < max_detections], rank[rank < max_detections]
    image = image[kept]

    placement = geometry[image]
    scale, pad, limit = placement[:, :1], placement[:, [1, 2, 1, 2]], placement[:, [3, 4, 3, 4]]
    out_boxes = np.zeros((batch, max_detections, 4), dtype=np.float32)
    out_scores = np.zeros((batch, max_detections), dtype=np.float32)
    out_classes = np.zeros((batch, max_detections), dtype=np.int32)
    out_boxes[image, rank] = np.clip((boxes[kept] - pad) / scale, 0, limit)
    out_scores[image, rank] = scores[kept]
    out_classes[image, rank] = classes[kept]
    counts = np.bincount(image, minlength=batch).astype(np.int32).reshape(-1, 1)
    return counts, out_boxes, out_scores, out_classes
