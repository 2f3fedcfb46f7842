"""Does a faster build of the detector (FP16 ONNX, TensorRT engine) still give the FP32 model's answers?

Two levels, both against the FP32 ONNX model run by ONNX Runtime on the same preprocessed boards:

* raw ``output0`` [B, 4 + C, N]: no NaN/Inf, and every element within ``|cand - ref| <= atol + rtol * |ref|``.
  Rows 0-3 are box cx, cy, w, h in input pixels (0..640) and rows 4.. are class scores in [0, 1], so one
  tolerance cannot mean the same for both: boxes are compared in units of the input side (pixels / 640),
  which makes atol = 5e-3 a 3.2 px allowance plus rtol of the coordinate itself, while scores are compared as
  they are. Scores are what decide detections, boxes only move them.
* detections after the served postprocess (threshold, NMS, top-K, back to original pixels): each reference
  detection must find a candidate of the same class with box IoU >= ``min_iou`` and a score within
  ``max_score_drift``. A detection present on one side only is forgiven when its score lies within
  ``max_score_drift`` of the cut that removed it on the other side (the score threshold, or the K-th score
  when the list is full): it sat on the boundary, and a drift that small legitimately moves it across.

Every function here is plain NumPy, so the same checks run on CPU in tests (FP16 ONNX vs FP32) and on a GPU
host against a TensorRT engine.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from tqdm import tqdm

from tools.contract import BOX_COORDINATES, served_contract
from tools.detections import Detections, box_iou
from tools.pipeline_math import postprocess_as_served

DEFAULT_ATOL = 5e-3
DEFAULT_RTOL = 5e-3
DEFAULT_MIN_IOU = 0.9
DEFAULT_MAX_SCORE_DRIFT = 0.02


@dataclass(frozen=True)
class ToleranceReport:
    """How far one block of the candidate output strays from the reference."""

    name: str
    elements: int
    nonfinite: int  # NaN or Inf in the candidate
    violations: int  # finite elements outside atol + rtol * |ref|
    max_abs_error: float  # in the block's own units (pixels for boxes)
    worst_ratio: float  # max |cand - ref| / (atol + rtol * |ref|); <= 1 means within tolerance

    @property
    def passed(self) -> bool:
        return self.nonfinite == 0 and self.violations == 0

    def line(self) -> str:
        status = "ok" if self.passed else "FAIL"
        return (
            f"{self.name:<6} {status:<4} max |diff| {self.max_abs_error:.3g}, worst/tolerance {self.worst_ratio:.3f}, "
            f"{self.violations} of {self.elements} outside, {self.nonfinite} NaN/Inf"
        )


def tolerance_report(
    name: str, reference: np.ndarray, candidate: np.ndarray, atol: float, rtol: float, unit: float = 1.0
) -> ToleranceReport:
    """Compare ``candidate`` with ``reference`` after dividing both by ``unit``; errors are reported in raw units."""
    reference = np.asarray(reference, dtype=np.float64)
    candidate = np.asarray(candidate, dtype=np.float64)
    if reference.shape != candidate.shape:
        raise ValueError(f"{name}: shapes differ, reference {reference.shape} vs candidate {candidate.shape}")
    finite = np.isfinite(candidate)
    error = np.abs(candidate - reference)
    allowed = atol + rtol * np.abs(reference / unit)
    ratio = np.where(finite, error / unit / allowed, 0.0)
    return ToleranceReport(
        name=name,
        elements=int(reference.size),
        nonfinite=int(np.count_nonzero(~finite)),
        violations=int(np.count_nonzero(ratio > 1.0)),
        max_abs_error=float(error[finite].max(initial=0.0)),
        worst_ratio=float(ratio.max(initial=0.0)),
    )


def raw_output_reports(
    reference: np.ndarray, candidate: np.ndarray, input_size: int, atol: float = DEFAULT_ATOL, rtol: float = DEFAULT_RTOL
) -> list[ToleranceReport]:
    """Tolerance reports for the box rows (in units of the input side) and the score rows of ``output0``."""
    return [
        tolerance_report("boxes", reference[:, :BOX_COORDINATES], candidate[:, :BOX_COORDINATES], atol, rtol, unit=float(input_size)),
        tolerance_report("scores", reference[:, BOX_COORDINATES:], candidate[:, BOX_COORDINATES:], atol, rtol),
    ]


@dataclass(frozen=True)
class ImageAgreement:
    """Pairing of one image's candidate detections with the reference ones."""

    matched_ious: np.ndarray  # IoU of each matched pair
    matched_score_drifts: np.ndarray  # |candidate score - reference score| of each matched pair
    borderline_unmatched: int  # one-sided detections within the drift of their cut: forgiven
    unmatched_reference: int  # reference detections with no counterpart, not borderline
    unmatched_candidate: int  # candidate detections with no counterpart, not borderline


def cut_score(detections: Detections, score_threshold: float, max_detections: int) -> float:
    """The score below which a detection is dropped: the threshold, or the lowest kept score of a full list."""
    if len(detections.scores) >= max_detections:
        return max(score_threshold, float(np.min(detections.scores)))
    return score_threshold


def pair_detections(
    reference: Detections,
    candidate: Detections,
    score_threshold: float,
    max_detections: int,
    min_iou: float = DEFAULT_MIN_IOU,
    max_score_drift: float = DEFAULT_MAX_SCORE_DRIFT,
) -> ImageAgreement:
    """Greedy pairing: reference detections by descending score each take the same-class candidate of highest IoU."""
    iou = box_iou(reference.boxes, candidate.boxes)
    same_class = np.asarray(reference.classes).reshape(-1, 1) == np.asarray(candidate.classes).reshape(1, -1)
    iou = np.where(same_class, iou, -1.0)
    candidate_taken = np.zeros(len(candidate.scores), dtype=bool)
    reference_taken = np.zeros(len(reference.scores), dtype=bool)
    pairs = []
    for ref_index in np.argsort(-np.asarray(reference.scores, dtype=np.float64), kind="stable"):
        overlaps = np.where(candidate_taken, -1.0, iou[ref_index])
        if overlaps.size == 0:
            break
        best = int(np.argmax(overlaps))
        if overlaps[best] >= min_iou:
            candidate_taken[best] = True
            reference_taken[ref_index] = True
            pairs.append((ref_index, best, overlaps[best]))
    ref_scores = np.asarray(reference.scores, dtype=np.float64)
    cand_scores = np.asarray(candidate.scores, dtype=np.float64)
    # A one-sided detection is borderline when the other side's cut lies within the allowed drift of it.
    ref_left = ref_scores[~reference_taken]
    cand_left = cand_scores[~candidate_taken]
    ref_borderline = np.abs(ref_left - cut_score(candidate, score_threshold, max_detections)) <= max_score_drift
    cand_borderline = np.abs(cand_left - cut_score(reference, score_threshold, max_detections)) <= max_score_drift
    return ImageAgreement(
        matched_ious=np.array([p[2] for p in pairs], dtype=np.float64),
        matched_score_drifts=np.array([abs(cand_scores[c] - ref_scores[r]) for r, c, _ in pairs], dtype=np.float64),
        borderline_unmatched=int(ref_borderline.sum() + cand_borderline.sum()),
        unmatched_reference=int((~ref_borderline).sum()),
        unmatched_candidate=int((~cand_borderline).sum()),
    )


@dataclass(frozen=True)
class DetectionAgreement:
    """Detection-level agreement over a set of images."""

    images: int
    reference_detections: int
    matched: int
    borderline_unmatched: int
    unmatched_reference: int
    unmatched_candidate: int
    min_iou: float  # lowest IoU among matched pairs (1.0 when nothing matched)
    max_score_drift: float  # largest score drift among matched pairs
    allowed_score_drift: float

    @property
    def passed(self) -> bool:
        return (
            self.unmatched_reference == 0
            and self.unmatched_candidate == 0
            and self.max_score_drift <= self.allowed_score_drift
        )

    def line(self) -> str:
        status = "ok" if self.passed else "FAIL"
        if self.reference_detections == 0:
            status += " (but the reference found nothing on these boards: nothing was compared)"
        return (
            f"detections {status}: {self.matched} of {self.reference_detections} reference detections matched on "
            f"{self.images} images (min IoU {self.min_iou:.3f}, max score drift {self.max_score_drift:.4f} "
            f"<= {self.allowed_score_drift}), {self.unmatched_reference} reference / {self.unmatched_candidate} "
            f"candidate unmatched, {self.borderline_unmatched} borderline forgiven"
        )


def detection_agreement(
    references: Sequence[Detections],
    candidates: Sequence[Detections],
    score_threshold: float,
    max_detections: int,
    min_iou: float = DEFAULT_MIN_IOU,
    max_score_drift: float = DEFAULT_MAX_SCORE_DRIFT,
) -> DetectionAgreement:
    """Pair every image's detections and pool the outcome."""
    if len(references) != len(candidates):
        raise ValueError(f"{len(references)} reference images but {len(candidates)} candidate images")
    per_image = [
        pair_detections(ref, cand, score_threshold, max_detections, min_iou, max_score_drift)
        for ref, cand in zip(references, candidates)
    ]
    ious = np.concatenate([a.matched_ious for a in per_image] + [np.ones(1)])
    drifts = np.concatenate([a.matched_score_drifts for a in per_image] + [np.zeros(1)])
    return DetectionAgreement(
        images=len(per_image),
        reference_detections=sum(len(r.scores) for r in references),
        matched=sum(len(a.matched_ious) for a in per_image),
        borderline_unmatched=sum(a.borderline_unmatched for a in per_image),
        unmatched_reference=sum(a.unmatched_reference for a in per_image),
        unmatched_candidate=sum(a.unmatched_candidate for a in per_image),
        min_iou=float(ious.min()),
        max_score_drift=float(drifts.max()),
        allowed_score_drift=max_score_drift,
    )


Runner = Callable[[np.ndarray], np.ndarray]


def onnxruntime_runner(model_path) -> Runner:
    """A Runner that feeds ONNX Runtime's CPU provider and returns the first output (``output0``)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    return lambda images: session.run(None, {input_name: images})[0]


def run_in_batches(runner: Runner, images: np.ndarray, batch_size: int, description: str) -> np.ndarray:
    """``output0`` for every image, fed to ``runner`` ``batch_size`` at a time (with a progress bar)."""
    outputs = [
        runner(images[start : start + batch_size])
        for start in tqdm(range(0, len(images), batch_size), desc=description, unit="batch")
    ]
    return np.concatenate(outputs)


@dataclass(frozen=True)
class Verdict:
    """Everything compared, and whether the candidate can replace the reference."""

    raw: list[ToleranceReport]
    detections: DetectionAgreement

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.raw) and self.detections.passed

    def lines(self) -> list[str]:
        verdict = "PASS: candidate agrees with the FP32 reference" if self.passed else "FAIL: candidate disagrees"
        return [r.line() for r in self.raw] + [self.detections.line(), verdict]


def compare_outputs(
    reference: np.ndarray,
    candidate: np.ndarray,
    geometry: np.ndarray,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
    min_iou: float = DEFAULT_MIN_IOU,
    max_score_drift: float = DEFAULT_MAX_SCORE_DRIFT,
) -> Verdict:
    """Raw and detection-level comparison of two ``output0`` batches of the same preprocessed boards.

    Detections are compared as served: the postprocess model's IoU threshold and K, at the lower of its two
    deployed score thresholds (with and without a template), which compares the more detections.
    """
    contract = served_contract()
    score_threshold = min(contract.score_threshold, contract.template_score_threshold)

    def detections(output):
        return Detections.from_padded(*postprocess_as_served(output, geometry, score_threshold=score_threshold,
                                                             contract=contract))

    return Verdict(
        raw=raw_output_reports(reference, candidate, contract.input_size, atol, rtol),
        detections=detection_agreement(
            detections(reference),
            detections(candidate),
            score_threshold,
            contract.max_detections,
            min_iou,
            max_score_drift,
        ),
    )
