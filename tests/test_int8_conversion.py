"""The INT8 QDQ detector (tools.engine.int8): float32 I/O unchanged, feature layers quantised, decode tail in
FP32, metadata recorded, and agreement with the FP32 model on real boards through ONNX Runtime on CPU.

Kept fast: the fixture calibrates on 8 of the boards the tool uses (the tool's default is 32) and the check
runs on 4 further boards, at the tool's INT8 tolerances (tools.engine.int8: scores within 0.05 + 5 %, boxes
within 32 px + 5 %, a 1e-4 share of single-anchor outliers, detections IoU >= 0.8 and score drift <= 0.1).
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from tools.contract import CPU_CONFIG_NAME, load_repository, parameter, served_contract
from tools.data.board_batches import load_mixed_boards
from tools.data.splits import METADATA_KEY, agreement_boards
from tools.engine.agreement import onnxruntime_runner, run_in_batches
from tools.engine.fp16 import DEFAULT_CALIBRATION_BOARDS, WEIGHT_OPS, decode_tail, file_sha256, name_unnamed_nodes
from tools.engine.int8 import (
    CALIBRATION_KEY,
    CONVERTER_KEY,
    DEFAULT_OUTPUT,
    DEFAULT_SOURCE,
    SOURCE_HASH_KEY,
    BoardReader,
    convert,
    int8_verdict,
)

CALIBRATION_BOARDS = 8
CHECK_BOARDS = 4


@pytest.fixture(scope="module")
def int8_boards(deeppcb_root):
    boards = agreement_boards(DEFAULT_SOURCE)
    return boards[:CALIBRATION_BOARDS], boards[CALIBRATION_BOARDS : CALIBRATION_BOARDS + CHECK_BOARDS]


@pytest.fixture(scope="module")
def int8_model(tmp_path_factory, int8_boards):
    """About 3 s on 2 cores: below SLOW_FIXTURES' bar."""
    output = tmp_path_factory.mktemp("int8") / "model.int8.onnx"
    model = convert(DEFAULT_SOURCE, output, int8_boards[0])
    return model, output


@pytest.fixture(scope="module")
def default_int8(tmp_path_factory, deeppcb_root):
    """The tool's default calibration set, so the result must reproduce the committed file (about 3 s)."""
    output = tmp_path_factory.mktemp("int8_default") / "model.int8.onnx"
    convert(DEFAULT_SOURCE, output, agreement_boards(DEFAULT_SOURCE)[:DEFAULT_CALIBRATION_BOARDS])
    return output


@pytest.fixture(scope="module")
def int8_outputs(int8_model, int8_boards):
    images, geometry = load_mixed_boards(int8_boards[1])
    reference = run_in_batches(onnxruntime_runner(DEFAULT_SOURCE), images, 4, "FP32")
    candidate = run_in_batches(onnxruntime_runner(int8_model[1]), images, 4, "INT8")
    return reference, candidate, geometry


def io_signature(model: onnx.ModelProto):
    return [
        (value.name, value.type.tensor_type.elem_type, [d.dim_value or d.dim_param for d in value.type.tensor_type.shape.dim])
        for value in list(model.graph.input) + list(model.graph.output)
    ]


def producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {tensor: node for node in model.graph.node for tensor in node.output}


def test_inputs_and_outputs_keep_their_names_types_and_shapes(int8_model):
    """A drop-in for the CPU config's onnx_file: the served pixel type in (uint8), float32 detections out."""
    source = onnx.load(str(DEFAULT_SOURCE))
    assert io_signature(int8_model[0]) == io_signature(source)
    served_input = onnx.helper.np_dtype_to_tensor_dtype(served_contract().pixel_type)
    assert [elem for _, elem, _ in io_signature(int8_model[0])] == [served_input, onnx.TensorProto.FLOAT]


def test_feature_convolutions_are_int8_and_the_decode_tail_stays_fp32(int8_model):
    model = int8_model[0]
    made_by = producers(model)
    source = onnx.load(str(DEFAULT_SOURCE))
    name_unnamed_nodes(source)
    tail = set(decode_tail(source))
    weight_nodes = [node for node in model.graph.node if node.op_type in WEIGHT_OPS]
    weight_is_int8 = {node.name: made_by.get(node.input[1], node).op_type == "DequantizeLinear" for node in weight_nodes}
    feature = [name for name in weight_is_int8 if name not in tail]
    output_layers = [name for name in weight_is_int8 if name in tail]
    assert feature and all(weight_is_int8[name] for name in feature)
    assert output_layers and not any(weight_is_int8[name] for name in output_layers)
    # Nothing of the tail is wrapped in QuantizeLinear: box coordinates never pass through 8 bits.
    quantized = {node.input[0] for node in model.graph.node if node.op_type == "QuantizeLinear"}
    tail_outputs = {tensor for node in model.graph.node if node.name in tail for tensor in node.output}
    assert not tail_outputs & quantized
    assert made_by["output0"].op_type not in ("DequantizeLinear", "QuantizeLinear")


def test_shapes_read_the_int8_tensors_not_dequantised_copies(int8_model):
    model = int8_model[0]
    made_by = producers(model)
    shapes = [node for node in model.graph.node if node.op_type == "Shape"]
    assert shapes
    assert not [node.name for node in shapes if made_by.get(node.input[0], node).op_type == "DequantizeLinear"]


def test_agrees_with_fp32_at_the_int8_tolerances(int8_outputs):
    reference, candidate, geometry = int8_outputs
    assert np.isfinite(candidate).all()
    verdict, passed = int8_verdict(reference, candidate, geometry)
    assert verdict.detections.reference_detections > 0, "no detections to compare: the check would be empty"
    assert passed, "\n".join(verdict.lines())


def test_converted_model_records_its_source_calibration_and_split(int8_model):
    metadata = {prop.key: prop.value for prop in int8_model[0].metadata_props}
    assert metadata[SOURCE_HASH_KEY] == file_sha256(DEFAULT_SOURCE)
    assert metadata[CALIBRATION_KEY].startswith(f"{CALIBRATION_BOARDS} boards")
    assert "QDQ" in metadata[CONVERTER_KEY]
    # The split travels along, so tools.eval --split val accepts a repository serving the INT8 file.
    source = {prop.key: prop.value for prop in onnx.load(str(DEFAULT_SOURCE), load_external_data=False).metadata_props}
    assert metadata[METADATA_KEY] == source[METADATA_KEY]


def test_calibration_reader_yields_every_board_once_per_pass():
    images = np.zeros((5, 1, 4, 4), np.float32)
    reader = BoardReader(images, "images", batch_size=2)
    for _ in range(2):
        batches = iter(reader.get_next, None)
        assert [len(batch["images"]) for batch in batches] == [2, 2, 1]
        reader.rewind()


def test_the_cpu_fallback_serves_a_detector_made_from_the_committed_fp32_model():
    contract = served_contract()
    detector = load_repository(CPU_CONFIG_NAME)[contract.detector_model]
    served = contract.detector_version_dir / parameter(detector, "onnx_file")
    assert served.is_file()
    if served != DEFAULT_SOURCE:
        metadata = {prop.key: prop.value for prop in onnx.load(str(served), load_external_data=False).metadata_props}
        assert metadata.get(SOURCE_HASH_KEY) == file_sha256(DEFAULT_SOURCE), (
            f"{served.name} is stale: regenerate it with `python -m tools.engine.int8`"
        )


def test_committed_int8_model_was_made_from_the_committed_fp32_model():
    committed = onnx.load(str(DEFAULT_OUTPUT), load_external_data=False)
    metadata = {prop.key: prop.value for prop in committed.metadata_props}
    assert metadata.get(SOURCE_HASH_KEY) == file_sha256(DEFAULT_SOURCE), (
        f"{DEFAULT_OUTPUT.name} is stale: regenerate it with `python -m tools.engine.int8`"
    )


def test_conversion_reproduces_the_committed_int8_model(default_int8):
    """Same graph, same weights; activation scales may differ in their last bits (and zero points by one step)
    on another CPU, whose FP32 kernels sum in another order during calibration."""
    again, committed = onnx.load(str(default_int8)), onnx.load(str(DEFAULT_OUTPUT))
    hint = f"regenerate {DEFAULT_OUTPUT.name} with `python -m tools.engine.int8`"
    assert [(n.op_type, list(n.input), list(n.output)) for n in again.graph.node] == [
        (n.op_type, list(n.input), list(n.output)) for n in committed.graph.node
    ], hint
    committed_values = {init.name: onnx.numpy_helper.to_array(init) for init in committed.graph.initializer}
    for init in again.graph.initializer:
        value, reference = onnx.numpy_helper.to_array(init), committed_values[init.name]
        assert value.dtype == reference.dtype and value.shape == reference.shape, (init.name, hint)
        if np.issubdtype(value.dtype, np.floating):
            np.testing.assert_allclose(value, reference, rtol=1e-4, err_msg=f"{init.name}: {hint}")
        else:
            assert np.abs(value.astype(np.int64) - reference.astype(np.int64)).max(initial=0) <= 1, (init.name, hint)
