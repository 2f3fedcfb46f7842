"""The serve-time array code of the preprocess and postprocess models, for tools and tests.

Loads ``models/preprocess/1/image_ops.py`` and ``models/postprocess/1/box_ops.py`` by file path (the
models stay self-contained; nothing here is copied) and fills in the settings the served configs use, so
evaluation, engine checks and benchmarks see exactly what Triton computes::

    from tools.pipeline_math import preprocess_image, postprocess_batch
    tensor, geometry = preprocess_image(open("board.jpg", "rb").read())   # (1, 640, 640), (5,)
    num, boxes, scores, classes = postprocess_batch(output0, geometry[None], score_threshold=0.001)
"""
from __future__ import annotations

import functools
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

MODELS_ROOT = Path(__file__).resolve().parent.parent / "models"


def load_model_module(model: str, module: str):
    """Import models/<model>/1/<module>.py by path under a name unique to that model."""
    path = MODELS_ROOT / model / "1" / f"{module}.py"
    name = f"pcb_models_{model}_{module}"
    spec = importlib.util.spec_from_file_location(name, path)
    loaded = importlib.util.module_from_spec(spec)
    sys.modules[name] = loaded
    spec.loader.exec_module(loaded)
    return loaded


image_ops = load_model_module("preprocess", "image_ops")
box_ops = load_model_module("postprocess", "box_ops")
ImageRejected = image_ops.ImageRejected


def read_model_config(path: Path) -> model_config_pb2.ModelConfig:
    """Parse a Triton config.pbtxt (or configs/<name>.pbtxt) into its protobuf message."""
    return text_format.Parse(Path(path).read_text(), model_config_pb2.ModelConfig())


@dataclass(frozen=True)
class PipelineSettings:
    """The pre/postprocess settings of the served (default) configs."""

    channels: int
    input_height: int
    input_width: int
    pad_value: float
    max_image_pixels: int
    score_threshold: float
    iou_threshold: float
    pre_nms_top_k: int
    max_detections: int


@functools.lru_cache(maxsize=None)
def served_settings(models_root: Path = MODELS_ROOT) -> PipelineSettings:
    """Read the settings from ``models_root``'s preprocess and postprocess config.pbtxt."""
    pre = read_model_config(Path(models_root) / "preprocess" / "config.pbtxt")
    post = read_model_config(Path(models_root) / "postprocess" / "config.pbtxt")
    channels, height, width = next(o.dims for o in pre.output if o.name == "images")
    max_detections = next(o.dims for o in post.output if o.name == "BOXES")[0]
    return PipelineSettings(
        channels=channels,
        input_height=height,
        input_width=width,
        pad_value=float(pre.parameters["pad_value"].string_value),
        max_image_pixels=int(pre.parameters["max_image_pixels"].string_value),
        score_threshold=float(post.parameters["score_threshold"].string_value),
        iou_threshold=float(post.parameters["iou_threshold"].string_value),
        pre_nms_top_k=int(post.parameters["pre_nms_top_k"].string_value),
        max_detections=max_detections,
    )


def preprocess_image(encoded: bytes, settings: PipelineSettings | None = None, xp=np):
    """Encoded image bytes -> (tensor (C, H, W) float32 in [0, 1], geometry (5,) float32), as served.

    geometry = (scale, pad_x, pad_y, orig_width, orig_height). Raises ImageRejected for unusable input.
    """
    s = settings or served_settings()
    return image_ops.preprocess_image(encoded, s.input_height, s.input_width, s.channels, s.pad_value,
                                      s.max_image_pixels, xp)


def postprocess_batch(pred, geometry, score_threshold: float | None = None, iou_threshold: float | None = None,
                      max_detections: int | None = None, xp=np, *, pre_nms_top_k: int | None = None,
                      settings: PipelineSettings | None = None):
    """Detector output (B, 4 + num_classes, N) and geometry (B, 5) -> (num (B, 1), boxes (B, K, 4),
    scores (B, K), classes (B, K)) in original pixels, as served; None takes the served default."""
    s = settings or served_settings()
    return box_ops.postprocess_batch(
        pred, geometry,
        s.score_threshold if score_threshold is None else score_threshold,
        s.iou_threshold if iou_threshold is None else iou_threshold,
        s.max_detections if max_detections is None else max_detections,
        s.pre_nms_top_k if pre_nms_top_k is None else pre_nms_top_k,
        xp,
    )
