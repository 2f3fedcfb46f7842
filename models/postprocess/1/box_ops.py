"""Detector output -> final detections (EfficientNMS layout), written once for NumPy and CuPy (``xp``).

Per image: best class per anchor, score threshold (strictly greater), pre-NMS top-k by score, class-aware
NMS, at most K detections, boxes mapped back to original pixels and clipped, zero rows past the count.
"""
from __future__ import annotations

import numpy as np


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
    class_scores = pred[4:]
    best_class = xp.argmax(class_scores, axis=0)
    best_score = xp.max(class_scores, axis=0)
    candidates = xp.nonzero(best_score > score_threshold)[0]
    ranked = candidates[xp.argsort(-best_score[candidates], kind="stable")[:pre_nms_top_k]]
    boxes = cxcywh_to_xyxy(pred[:4, ranked].T, xp)
    keep = cluster_nms(boxes, best_class[ranked], iou_threshold, xp)
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
    out_scores[:count] = best_score[ranked[kept]]
    out_classes[:count] = best_class[ranked[kept]]
    return count, out_boxes, out_scores, out_classes


def postprocess_batch(pred, geometry, score_threshold: float, iou_threshold: float, max_detections: int,
                      pre_nms_top_k: int, xp=np):
    """A batch: pred (B, 4 + num_classes, N), geometry (B, 5).

    Returns (num_detections (B, 1) int32, boxes (B, K, 4) float32, scores (B, K) float32, classes (B, K) int32).
    """
    results = [
        postprocess_image(pred[i], geometry[i], score_threshold, iou_threshold, max_detections, pre_nms_top_k, xp)
        for i in range(pred.shape[0])
    ]
    counts, boxes, scores, classes = zip(*results)
    return (
        xp.asarray(counts, dtype=xp.int32).reshape(-1, 1),
        xp.stack(boxes),
        xp.stack(scores),
        xp.stack(classes),
    )
