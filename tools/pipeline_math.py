"""The serve-time code of the preprocess, postprocess and scan models, for tools and tests.

Loads ``models/preprocess/1/image_ops.py``, ``models/postprocess/1/box_ops.py`` and
``models/pcb_scan/1/tiling.py`` by file path (the models stay self-contained; nothing here is copied) and
fills in the settings of the served contract (``tools.contract``), so evaluation, engine checks and
benchmarks see exactly what the CPU server computes (the GPU configs run the array code of the same files
on CuPy; tests hold the two equal)::

    from tools.pipeline_math import preprocess_as_served, postprocess_as_served
    tensor, geometry, _ = preprocess_as_served(open("board.jpg", "rb").read())   # (2, 640, 640), (5,)
    num, boxes, scores, classes = postprocess_as_served(output0, geometry[None], score_threshold=0.001)
"""
from __future__ import annotations

import importlib.util
import sys

import numpy as np

from tools.contract import MODELS_ROOT, ServedContract, load_repository, parameter, served_contract


def load_model_module(model: str, module: str):
    """Import models/<model>/1/<module>.py by path under a name unique to that model. Its own imports of
    helpers beside it resolve as in the Triton stub, which puts the version folder on the path."""
    folder = MODELS_ROOT / model / "1"
    name = f"pcb_models_{model}_{module}"
    spec = importlib.util.spec_from_file_location(name, folder / f"{module}.py")
    loaded = importlib.util.module_from_spec(spec)
    sys.modules[name] = loaded
    sys.path.insert(0, str(folder))
    try:
        spec.loader.exec_module(loaded)
    finally:
        sys.path.remove(str(folder))
    return loaded


image_ops = load_model_module(served_contract().preprocess_model, "image_ops")
registration = sys.modules[image_ops.TemplateRejected.__module__]  # the helper image_ops imported, not a copy
box_ops = load_model_module(served_contract().postprocess_model, "box_ops")
thresholds = load_model_module(served_contract().postprocess_model, "thresholds")
tiling = load_model_module(served_contract().scan_model, "tiling")
ImageRejected = image_ops.ImageRejected
TemplateRejected = image_ops.TemplateRejected


def registration_settings(contract: ServedContract | None = None):
    """The served registration's settings (preprocess's config parameters)."""
    c = contract or served_contract()
    return registration.RegistrationSettings.from_parameters(c.registration_parameters, c.pad_value)


def scan_windows(height: int, width: int, contract: ServedContract | None = None):
    """The tiles the scan model cuts a height x width scan into (its config's tile_size and tile_overlap)."""
    c = contract or served_contract()
    config = load_repository(c.config_name, c.models_root)[c.scan_model]
    return tiling.tile_windows(height, width, int(parameter(config, "tile_size")), int(parameter(config, "tile_overlap")))


def preprocess_as_served(encoded: bytes, template: bytes | None = None, contract: ServedContract | None = None):
    """Encoded image (and template) bytes -> (tensor (C, H, W) of the detector's pixel type (uint8 grey levels,
    or float32 in [0, 1]), geometry (5,) float32,
    registration (4,) float32), as the CPU preprocess computes them. geometry = (scale, pad_x, pad_y,
    orig_width, orig_height); registration = (dx, dy, angle, score), zeros without a template. Raises
    ImageRejected or TemplateRejected for unusable input."""
    c = contract or served_contract()
    return image_ops.preprocess_image_opencv(encoded, c.input_height, c.input_width, c.channels, c.pad_value,
                                             c.max_image_pixels, template, registration_settings(c), c.pixel_type)


def postprocess_as_served(pred, geometry, *, score_threshold: float | None = None,
                          iou_threshold: float | None = None, registration=None, contract: ServedContract | None = None):
    """Detector output (B, 4 + num_classes, N) and geometry (B, 5) [and preprocess's REGISTRATION (B, 4)] ->
    (num (B, 1), boxes (B, K, 4), scores (B, K), classes (B, K)) in original pixels, as the CPU postprocess
    computes them; a threshold left None is the served default (for the score, each image's by its
    registration; without one, the no-template default)."""
    c = contract or served_contract()
    if score_threshold is None and registration is not None:
        score_threshold = thresholds.image_score_thresholds(np.asarray(registration)[:, 3], c.score_threshold,
                                                            c.template_score_threshold)
    return box_ops.postprocess_batch_opencv(
        pred, geometry,
        c.score_threshold if score_threshold is None else score_threshold,
        c.iou_threshold if iou_threshold is None else iou_threshold,
        c.max_detections, c.pre_nms_top_k,
    )
