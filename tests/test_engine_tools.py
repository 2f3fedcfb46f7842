"""Checks of the GPU tools that run without a GPU: profile, timing-cache key, the no-GPU message, typing mode,
and the agreement functions (the same ones that judge the TensorRT engine) on hand-made cases."""
from __future__ import annotations

import sys
from types import SimpleNamespace

import numpy as np
import pytest

from tools.contract import served_contract
from tools.detections import Detections
from tools.engine import build as build_engine
from tools.engine.agreement import detection_agreement, pair_detections, raw_output_reports, tolerance_report
from tools.engine.build import (
    DEFAULT_CONFIG,
    DEFAULT_ONNX,
    Gpu,
    MissingRequirement,
    engine_loaders,
    onnx_input,
    profile_shapes,
    query_gpu,
    read_max_batch_size,
    supports_strong_typing,
    timing_cache_name,
)

# ---- optimization profile ---------------------------------------------------------------------------------


def test_profile_spans_batch_one_to_the_detectors_max_batch_size():
    max_batch = read_max_batch_size(DEFAULT_CONFIG)
    name, image_shape = onnx_input(DEFAULT_ONNX)
    shapes = profile_shapes(image_shape, max_batch)
    assert name == "images"
    channels = served_contract().channels
    assert image_shape == (channels, 640, 640)
    assert max_batch == 32  # the contract's batch limit, which the ensemble passes through to the detector
    assert shapes.min == (1, channels, 640, 640)
    assert shapes.opt == (8, channels, 640, 640)
    assert shapes.max == (32, channels, 640, 640)


def test_opt_batch_is_clamped_into_the_profile():
    assert profile_shapes((1, 640, 640), max_batch_size=4).opt == (4, 1, 640, 640)
    assert profile_shapes((1, 640, 640), max_batch_size=4, opt_batch=0).opt == (1, 1, 640, 640)


def test_max_batch_size_is_read_with_protobuf_and_must_be_positive(tmp_path):
    config = tmp_path / "config.pbtxt"
    config.write_text('name: "d"\nplatform: "tensorrt_plan"\n# max_batch_size: 99 in a comment is not read\nmax_batch_size: 16\n')
    assert read_max_batch_size(config) == 16
    config.write_text('name: "d"\nplatform: "tensorrt_plan"\n')
    with pytest.raises(ValueError, match="max_batch_size is 0"):
        read_max_batch_size(config)


# ---- polygraphy loaders (made here with the pinned polygraphy; only calling them needs TensorRT) ----------


def build_settings():
    name, image_shape = onnx_input(DEFAULT_ONNX)
    return name, profile_shapes(image_shape, read_max_batch_size(DEFAULT_CONFIG))


def test_strongly_typed_loaders_carry_the_profile_cache_and_compatibility_options(tmp_path):
    name, shapes = build_settings()
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"cached tactics")
    level = object()  # stands in for trt.HardwareCompatibilityLevel.AMPERE_PLUS
    network, config = engine_loaders(DEFAULT_ONNX, name, shapes, True, cache, version_compatible=True,
                                     hardware_compatibility_level=level)
    assert network.strongly_typed and network.path == str(DEFAULT_ONNX)
    profile = config.profiles[0][name]
    assert (profile.min, profile.opt, profile.max) == (shapes.min, shapes.opt, shapes.max)
    assert config.fp16 is False  # precision is the graph's own; TensorRT 11 has no FP16 flag
    assert config.timing_cache_path == str(cache)
    assert config.version_compatible is True and config.hardware_compatibility_level is level
    assert "tensorrt" not in sys.modules


def test_without_strong_typing_the_loaders_fall_back_to_the_fp16_flag(tmp_path):
    name, shapes = build_settings()
    network, config = engine_loaders(DEFAULT_ONNX, name, shapes, False, tmp_path / "absent.cache")
    assert not network.strongly_typed
    assert config.fp16 is True
    assert config.timing_cache_path is None  # a first build starts without a cache and saves one
    assert config.version_compatible is None and config.hardware_compatibility_level is None


# ---- timing cache -----------------------------------------------------------------------------------------


def test_timing_cache_is_keyed_by_tensorrt_version_gpu_name_and_compute_capability():
    a10 = Gpu(name="NVIDIA A10", compute_capability="8.6")
    name = timing_cache_name("10.13.3.9", a10)
    assert name == "trt-10.13.3.9_nvidia-a10_sm86.cache"
    others = {
        timing_cache_name("11.4.0.106", a10),
        timing_cache_name("10.13.3.9", Gpu(name="NVIDIA L4", compute_capability="8.9")),
        timing_cache_name("10.13.3.9", Gpu(name="NVIDIA A10G", compute_capability="8.6")),
    }
    assert name not in others and len(others) == 3


# ---- without TensorRT or a GPU ----------------------------------------------------------------------------


def test_without_tensorrt_the_build_stops_and_says_where_to_run(capsys):
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("TensorRT is installed here; the missing-TensorRT path cannot be exercised")
    assert build_engine.main([]) == 2
    message = capsys.readouterr().err
    assert "TensorRT Python package is not installed" in message
    assert "docker build --target engine-builder" in message
    assert "--gpus all" in message and "python3 -m tools.engine.build" in message


def test_without_nvidia_smi_the_gpu_query_explains(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(MissingRequirement, match="nvidia-smi is not on PATH") as raised:
        query_gpu("0")
    assert "engine-builder" in str(raised.value)


def test_strong_typing_is_detected_from_the_creation_flag():
    with_flag = SimpleNamespace(NetworkDefinitionCreationFlag=SimpleNamespace(STRONGLY_TYPED=0))
    without_flag = SimpleNamespace(NetworkDefinitionCreationFlag=SimpleNamespace(EXPLICIT_BATCH=0))
    assert supports_strong_typing(with_flag)
    assert not supports_strong_typing(without_flag)


# ---- raw-output tolerance ---------------------------------------------------------------------------------


def test_tolerance_report_counts_violations_and_nonfinite_values():
    reference = np.array([0.0, 0.5, 1.0])
    assert tolerance_report("s", reference, reference + 0.004, atol=5e-3, rtol=0).passed
    off = tolerance_report("s", reference, reference + np.array([0.0, 0.006, 0.0]), atol=5e-3, rtol=0)
    assert (off.violations, off.passed) == (1, False)
    assert off.max_abs_error == pytest.approx(0.006)
    broken = tolerance_report("s", reference, np.array([np.nan, 0.5, np.inf]), atol=5e-3, rtol=5e-3)
    assert (broken.nonfinite, broken.violations, broken.passed) == (2, 0, False)


def test_boxes_are_judged_in_units_of_the_input_side_and_scores_as_they_are():
    reference = np.zeros((1, 10, 3), dtype=np.float32)
    reference[0, :4] = [[100.0, 320.0, 600.0]] * 4
    reference[0, 4:] = 0.5
    candidate = reference.copy()
    candidate[0, :4] += 3.0  # 3 px: under 640 * (5e-3 + 5e-3 * 100/640) = 3.7 px even for the smallest value
    candidate[0, 4:] += 0.006  # under 5e-3 + 5e-3 * 0.5 = 0.0075
    boxes, scores = raw_output_reports(reference, candidate, input_size=640)
    assert boxes.passed and scores.passed
    candidate[0, 0, 0] += 1.0  # 4 px on a 100 px coordinate: over the 3.7 px allowance
    candidate[0, 4, 0] += 0.002  # 0.008 on a 0.5 score
    boxes, scores = raw_output_reports(reference, candidate, input_size=640)
    assert (boxes.violations, scores.violations) == (1, 1)


# ---- detection matching -----------------------------------------------------------------------------------


detections = Detections.of
REFERENCE = detections([[0, 0, 100, 100], [200, 200, 260, 240]], [0.9, 0.6], [1, 4])


def test_identical_detections_match_completely():
    agreement = pair_detections(REFERENCE, REFERENCE, score_threshold=0.25, max_detections=100)
    assert agreement.matched_ious.tolist() == [1.0, 1.0]
    assert (agreement.unmatched_reference, agreement.unmatched_candidate, agreement.borderline_unmatched) == (0, 0, 0)


def test_moved_box_or_other_class_is_a_disagreement():
    moved = detections([[0, 0, 100, 100], [220, 200, 280, 240]], [0.9, 0.6], [1, 4])
    agreement = pair_detections(REFERENCE, moved, score_threshold=0.25, max_detections=100, min_iou=0.9)
    assert (len(agreement.matched_ious), agreement.unmatched_reference, agreement.unmatched_candidate) == (1, 1, 1)
    relabelled = detections([[0, 0, 100, 100], [200, 200, 260, 240]], [0.9, 0.6], [1, 3])
    agreement = pair_detections(REFERENCE, relabelled, score_threshold=0.25, max_detections=100)
    assert (agreement.unmatched_reference, agreement.unmatched_candidate) == (1, 1)


def test_a_detection_sitting_on_the_threshold_may_cross_it():
    reference = detections([[0, 0, 100, 100], [300, 300, 340, 340]], [0.9, 0.255], [1, 2])
    candidate = detections([[0, 0, 100, 100]], [0.9], [1])  # the 0.255 one fell to 0.249 and was cut
    agreement = pair_detections(reference, candidate, score_threshold=0.25, max_detections=100, max_score_drift=0.02)
    assert (agreement.borderline_unmatched, agreement.unmatched_reference) == (1, 0)
    far_above = detections([[0, 0, 100, 100], [300, 300, 340, 340]], [0.9, 0.5], [1, 2])
    agreement = pair_detections(far_above, candidate, score_threshold=0.25, max_detections=100, max_score_drift=0.02)
    assert (agreement.borderline_unmatched, agreement.unmatched_reference) == (0, 1)


def test_a_full_list_cuts_at_its_lowest_score():
    # K = 2: B (0.801) and C (0.799 in the reference) swap places across the cut; neither side is wrong.
    reference = detections([[0, 0, 10, 10], [20, 20, 30, 30]], [0.9, 0.801], [0, 0])
    candidate = detections([[0, 0, 10, 10], [40, 40, 50, 50]], [0.9, 0.805], [0, 0])
    agreement = pair_detections(reference, candidate, score_threshold=0.25, max_detections=2, max_score_drift=0.02)
    assert len(agreement.matched_ious) == 1
    assert (agreement.borderline_unmatched, agreement.unmatched_reference, agreement.unmatched_candidate) == (2, 0, 0)
    not_full = pair_detections(reference, candidate, score_threshold=0.25, max_detections=3, max_score_drift=0.02)
    assert (not_full.unmatched_reference, not_full.unmatched_candidate) == (1, 1)


def test_agreement_pools_images_and_fails_on_score_drift():
    drifted = detections([[0, 0, 100, 100], [200, 200, 260, 240]], [0.85, 0.6], [1, 4])
    pooled = detection_agreement([REFERENCE, REFERENCE], [REFERENCE, drifted], 0.25, 100, max_score_drift=0.02)
    assert (pooled.images, pooled.reference_detections, pooled.matched) == (2, 4, 4)
    assert pooled.max_score_drift == pytest.approx(0.05, abs=1e-6)
    assert not pooled.passed
    assert detection_agreement([REFERENCE], [REFERENCE], 0.25, 100).passed
