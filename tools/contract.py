"""The served contract, read from the model repository's Triton configs with protobuf.

This module is the one place tools and tests learn the facts the configs own: model names, tensor names,
batch sizes, the detector input size, the pre/postprocess parameters, K and the class labels. Nothing else
parses a config or repeats one of these values::

    from tools.contract import served_contract
    contract = served_contract()        # the default (production GPU) configs
    cpu = served_contract("cpu")        # as tritonserver --model-config-name=cpu loads them
    contract.pipeline_model, contract.image_input, contract.input_height, contract.template_score_threshold

Config selection follows ``tritonserver --model-config-name=NAME``: a model's ``configs/NAME.pbtxt`` when it
has one, else its ``config.pbtxt``.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2
from tritonclient.utils import triton_to_np_dtype

REPO_ROOT = Path(__file__).resolve().parent.parent
MODELS_ROOT = REPO_ROOT / "models"
CPU_CONFIG_NAME = "cpu"
CONFIG_NAMES = (None, CPU_CONFIG_NAME)  # the default (GPU) configs and the CPU fallback
LABELS_FILE = "labels.txt"  # in the detector's version folder
REGISTRATION_PARAMETERS = ("registration_max_shift", "registration_max_angle", "registration_min_score",
                           "template_size_tolerance", "registration_scale", "registration_local_max_shift")
BOX_COORDINATES = 4  # the detector output's first rows: cx, cy, w, h; one score row per class follows


def read_model_config(path: Path) -> model_config_pb2.ModelConfig:
    """Parse a Triton config.pbtxt (or configs/<name>.pbtxt) into its protobuf message."""
    return text_format.Parse(Path(path).read_text(), model_config_pb2.ModelConfig())


def model_dirs(models_root: Path = MODELS_ROOT) -> list[Path]:
    return sorted(path.parent for path in Path(models_root).glob("*/config.pbtxt"))


def config_path(model_dir: Path, config_name: str | None = None) -> Path:
    custom = Path(model_dir) / "configs" / f"{config_name}.pbtxt"
    return custom if config_name and custom.is_file() else Path(model_dir) / "config.pbtxt"


def load_repository(config_name: str | None = None,
                    models_root: Path = MODELS_ROOT) -> dict[str, model_config_pb2.ModelConfig]:
    """{model name: config} for every model, as tritonserver --model-config-name=config_name loads them."""
    return {path.name: read_model_config(config_path(path, config_name)) for path in model_dirs(models_root)}


def parameter(config: model_config_pb2.ModelConfig, key: str) -> str:
    """A config parameter's string value; KeyError naming the model when it is not set."""
    if key not in config.parameters:
        raise KeyError(f"{config.name} has no parameter {key!r}")
    return config.parameters[key].string_value


def tensor(tensors, name: str):
    """The input or output called ``name`` of a config's tensor list; KeyError when there is none."""
    for candidate in tensors:
        if candidate.name == name:
            return candidate
    raise KeyError(f"no tensor {name!r} among {[t.name for t in tensors]}")


def numpy_dtype(data_type: int) -> np.dtype:
    """The NumPy dtype of a config's ``data_type`` (TYPE_UINT8 -> uint8)."""
    return np.dtype(triton_to_np_dtype(model_config_pb2.DataType.Name(data_type).removeprefix("TYPE_")))


def read_labels(path: Path) -> tuple[str, ...]:
    """Class names, one per non-empty line, in class-id order."""
    return tuple(line.strip() for line in Path(path).read_text().splitlines() if line.strip())


@dataclass(frozen=True)
class ServedContract:
    """What a client, a tool or a test may rely on, as the configs of one model repository state it."""

    models_root: Path
    config_name: str | None
    pipeline_model: str  # the ensemble: one request with the encoded image, the detections back
    scan_model: str  # one request with a whole-board scan: tiles it through the pipeline (BLS)
    model_names: tuple[str, ...]  # every model of the repository
    preprocess_model: str  # the ensemble's steps, in order
    detector_model: str
    postprocess_model: str
    image_input: str  # the ensemble's encoded-image input
    template_input: str  # its optional input: the board's defect-free template, encoded as the image
    registration_output: str  # preprocess's (and the ensemble's) dx, dy, angle, score of the template
    output_names: tuple[str, ...]  # the ensemble's outputs: count, boxes, scores, classes
    max_batch_size: int
    preferred_batch_sizes: tuple[int, ...]  # the detector's dynamic batcher
    detector_model_file: str  # the file Triton loads from the version folder ("" for a Python-backend detector)
    detector_input: str
    detector_output: str
    geometry_output: str  # preprocess's letterbox geometry, read by postprocess
    channels: int
    pixel_type: np.dtype  # of the detector input: uint8 grey levels (the graph scales them) or float32 in [0, 1]
    input_height: int
    input_width: int
    num_classes: int
    pad_value: float
    max_image_pixels: int
    registration_parameters: dict[str, float]  # preprocess's registration_* and template_size_tolerance
    score_threshold: float  # the deployed operating point without a template; requests may override it
    template_score_threshold: float  # the one for images whose template registered
    iou_threshold: float
    pre_nms_top_k: int
    max_detections: int  # K: rows of BOXES, SCORES and CLASSES
    labels: tuple[str, ...]
    uncounted_parameter: str  # a request parameter that keeps the request out of the pcb_* metrics (the canary)

    @property
    def typical_batch_size(self) -> int:
        """The middle preferred batch size: what the batcher forms most under load. Clients send tiles this
        many to a request, and the TensorRT profile is tuned for it."""
        sizes = sorted(self.preferred_batch_sizes)
        return sizes[len(sizes) // 2]

    @property
    def input_size(self) -> int:
        """The detector input's side; the detector input is square."""
        if self.input_height != self.input_width:
            raise ValueError(f"detector input {self.input_height}x{self.input_width} is not square")
        return self.input_height

    def deployed_score_threshold(self, registration) -> float:
        """postprocess's default score threshold for an image with this ``REGISTRATION`` (None without a
        template): the template one where the template registered (a score > 0; for a scan, in any tile's row:
        a blank tile scored 0 is judged at the other, and has nothing to report). The rule is postprocess's own
        (its thresholds.py), not a copy."""
        from tools.pipeline_math import thresholds  # imported here: pipeline_math reads this module at import

        score = 0.0 if registration is None else float(np.asarray(registration).reshape(-1, 4)[:, 3].max(initial=0.0))
        return float(thresholds.image_score_thresholds(score, self.score_threshold, self.template_score_threshold))

    @property
    def detector_version_dir(self) -> Path:
        """The detector's version folder: its ONNX models, engine, labels and model card."""
        return self.models_root / self.detector_model / "1"

    @property
    def detector_onnx(self) -> Path:
        """The FP32 ONNX detector: the CPU fallback serves it; the FP16 graph and the engine are built from it."""
        return self.detector_version_dir / "model.onnx"


@functools.lru_cache(maxsize=None)
def served_contract(config_name: str | None = None, models_root: Path = MODELS_ROOT) -> ServedContract:
    """The contract of ``models_root`` under ``--model-config-name=config_name`` (None: the default configs)."""
    models_root = Path(models_root)
    configs = load_repository(config_name, models_root)
    ensembles = [config for config in configs.values() if config.platform == "ensemble"]
    if len(ensembles) != 1:
        raise ValueError(f"{models_root}: expected one ensemble, found {[c.name for c in ensembles]}")
    pipeline = ensembles[0]
    preprocess, detector, postprocess = (configs[step.model_name] for step in pipeline.ensemble_scheduling.step)
    scanners = [c.name for c in configs.values()
                if "pipeline_model" in c.parameters and parameter(c, "pipeline_model") == pipeline.name]
    if len(scanners) != 1:
        raise ValueError(f"{models_root}: expected one scan model calling {pipeline.name}, found {scanners}")
    (image_input,) = [i for i in pipeline.input if not i.optional]
    (template_input,) = [i for i in pipeline.input if i.optional]
    detector_input, detector_output = detector.input[0].name, detector.output[0].name
    registration_output = next(o.name for o in pipeline.output if o.name in {p.name for p in preprocess.output})
    (geometry_output,) = [o.name for o in preprocess.output if o.name not in (detector_input, registration_output)]
    channels, height, width = tensor(preprocess.output, detector_input).dims
    output_names = tuple(o.name for o in pipeline.output if o.name != registration_output)
    return ServedContract(
        models_root=models_root,
        config_name=config_name,
        pipeline_model=pipeline.name,
        scan_model=scanners[0],
        model_names=tuple(sorted(configs)),
        preprocess_model=preprocess.name,
        detector_model=detector.name,
        postprocess_model=postprocess.name,
        image_input=image_input.name,
        template_input=template_input.name,
        registration_output=registration_output,
        output_names=output_names,
        max_batch_size=pipeline.max_batch_size,
        preferred_batch_sizes=tuple(detector.dynamic_batching.preferred_batch_size),
        detector_model_file=detector.default_model_filename,
        detector_input=detector_input,
        detector_output=detector_output,
        geometry_output=geometry_output,
        channels=channels,
        pixel_type=numpy_dtype(tensor(preprocess.output, detector_input).data_type),
        input_height=height,
        input_width=width,
        num_classes=tensor(detector.output, detector_output).dims[0] - BOX_COORDINATES,
        pad_value=float(parameter(preprocess, "pad_value")),
        max_image_pixels=int(parameter(preprocess, "max_image_pixels")),
        registration_parameters={key: float(parameter(preprocess, key)) for key in REGISTRATION_PARAMETERS},
        score_threshold=float(parameter(postprocess, "score_threshold")),
        template_score_threshold=float(parameter(postprocess, "template_score_threshold")),
        iou_threshold=float(parameter(postprocess, "iou_threshold")),
        pre_nms_top_k=int(parameter(postprocess, "pre_nms_top_k")),
        max_detections=tensor(postprocess.output, output_names[1]).dims[0],
        labels=read_labels(models_root / detector.name / "1" / LABELS_FILE),
        uncounted_parameter=parameter(postprocess, "uncounted_parameter"),
    )
