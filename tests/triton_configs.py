"""The model repository's Triton configs as Triton reads them (protobuf), for static checks.

``load_repository(config_name)`` resolves each model's config the way ``tritonserver
--model-config-name=<config_name>`` does: ``configs/<config_name>.pbtxt`` when the model has one, else
its ``config.pbtxt``. ``config_name=None`` is the default (production GPU) repository.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from tritonclient.grpc import model_config_pb2
from tritonclient.utils import np_to_triton_dtype

from tools.pipeline_math import MODELS_ROOT, read_model_config

CONFIG_NAMES = (None, "cpu")  # default (GPU) and the CPU fallback


def model_dirs(models_root: Path = MODELS_ROOT) -> list[Path]:
    return sorted(path.parent for path in Path(models_root).glob("*/config.pbtxt"))


def config_files(models_root: Path = MODELS_ROOT) -> list[Path]:
    """Every config.pbtxt and configs/*.pbtxt in the repository."""
    root = Path(models_root)
    return sorted([*root.glob("*/config.pbtxt"), *root.glob("*/configs/*.pbtxt")])


def config_path(model_dir: Path, config_name: str | None = None) -> Path:
    custom = Path(model_dir) / "configs" / f"{config_name}.pbtxt"
    return custom if config_name and custom.is_file() else Path(model_dir) / "config.pbtxt"


def load_repository(config_name: str | None = None, models_root: Path = MODELS_ROOT) -> dict[str, model_config_pb2.ModelConfig]:
    """{model name: config} for every model, as tritonserver --model-config-name=config_name loads them."""
    return {model_dir.name: read_model_config(config_path(model_dir, config_name)) for model_dir in model_dirs(models_root)}


def data_type_name(data_type: int) -> str:
    """Config enum value -> its name, e.g. TYPE_FP32."""
    return model_config_pb2.DataType.Name(data_type)


def tensor_specs(tensors) -> dict[str, tuple[str, list[int]]]:
    """{name: (TYPE_*, dims)} of a config's input or output list (dims without the batch dimension)."""
    return {tensor.name: (data_type_name(tensor.data_type), list(tensor.dims)) for tensor in tensors}


def onnx_specs(values) -> dict[str, tuple[str, list[int]]]:
    """{name: (TYPE_*, dims)} of ONNX graph inputs or outputs, dims in full with -1 for symbolic ones."""
    specs = {}
    for value in values:
        tensor_type = value.type.tensor_type
        dtype = np_to_triton_dtype(np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)))
        dims = [dim.dim_value if dim.HasField("dim_value") else -1 for dim in tensor_type.shape.dim]
        specs[value.name] = (f"TYPE_{dtype}", dims)
    return specs


def onnx_io(path: Path) -> tuple[dict[str, tuple[str, list[int]]], dict[str, tuple[str, list[int]]]]:
    """(inputs, outputs) of an ONNX model as {name: (TYPE_*, dims)}; the weights are not loaded."""
    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {init.name for init in graph.initializer}
    return onnx_specs(v for v in graph.input if v.name not in initializers), onnx_specs(graph.output)


def dims_compatible(a: list[int], b: list[int]) -> bool:
    """Same rank and every dimension equal or a -1 wildcard on either side."""
    return len(a) == len(b) and all(x == y or -1 in (x, y) for x, y in zip(a, b))


def parameter(config: model_config_pb2.ModelConfig, key: str) -> str:
    """A config parameter's string value; KeyError naming the model when it is not set."""
    if key not in config.parameters:
        raise KeyError(f"{config.name} has no parameter {key!r}")
    return config.parameters[key].string_value
