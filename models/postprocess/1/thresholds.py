"""Reading the score / IoU thresholds a request may override, and the deployed score threshold of each image."""
from __future__ import annotations

import math

import numpy as np

THRESHOLD_NAMES = ("score_threshold", "iou_threshold")


def parse_threshold(name: str, value) -> float:
    """A threshold given as a number or a numeric string, finite and within [0, 1]; ValueError otherwise."""
    number = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            number = None
    if number is None or not math.isfinite(number) or not 0 <= number <= 1:
        raise ValueError(f"parameter '{name}' must be a number between 0 and 1, got {value!r}")
    return number


def resolve_thresholds(request_parameters: dict, defaults: dict[str, float]) -> dict[str, float]:
    """The thresholds for one request: ``defaults`` overridden by any of THRESHOLD_NAMES it sets."""
    return {
        name: parse_threshold(name, request_parameters[name]) if name in request_parameters else default
        for name, default in defaults.items()
    }


def image_score_thresholds(registration_scores, score_threshold: float, template_score_threshold: float) -> np.ndarray:
    """The deployed score threshold of each image: ``template_score_threshold`` where its template registered
    (REGISTRATION's score > 0; all zeros without a template), ``score_threshold`` elsewhere."""
    return np.where(np.asarray(registration_scores) > 0, template_score_threshold, score_threshold)
