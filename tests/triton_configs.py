"""The model repository's Triton configs as Triton reads them (protobuf), for static checks.

Reading the configs is ``tools.contract``'s job (``load_repository``); these helpers compare them with each
other and with the ONNX model.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from tritonclient.grpc import model_config_pb2
from tritonclient.utils import np_to_triton_dtype

from tools.contract import MODELS_ROOT


def config_files(models_root: Path = MODELS_ROOT) -> list[Path]:
    """Every config.pbtxt and configs/*.pbtxt in the repository."""
    root = Path(models_root)
    return sorted([*root.glob("*/config.pbtxt"), *root.glob("*/configs/*.pbtxt")])


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
