"""The FP16 mixed-precision detector (tools.engine.fp16): which nodes run in FP16, unchanged float32 I/O, and
agreement with the FP32 model on real boards through ONNX Runtime on CPU.

What the raw tolerance (atol = rtol = 5e-3) means here: class scores (in [0, 1]) are compared as they are, so a
score may move by 0.005 plus 0.5 % of itself; box rows are compared in units of the 640 px input side, so a
coordinate may move by 3.2 px plus 0.5 % of itself. Scores decide which detections exist, so they get the
tight absolute bound; boxes are then held to IoU >= 0.9 with their FP32 counterpart at detection level.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from tools.data.board_batches import load_boards
from tools.data.splits import agreement_boards
from tools.engine.agreement import compare_outputs, onnxruntime_runner, run_in_batches
from tools.engine.fp16 import (
    DEFAULT_CALIBRATION_BOARDS,
    DEFAULT_OUTPUT,
    DEFAULT_SOURCE,
    SOURCE_HASH_KEY,
    WEIGHT_OPS,
    convert,
    decode_tail,
    file_sha256,
    node_precisions,
)

FP16 = onnx.TensorProto.FLOAT16
FP32 = onnx.TensorProto.FLOAT
CHECK_BOARDS = 16


@pytest.fixture(scope="module")
def boards(deeppcb_root):
    # The tool's default calibration set, so the fixture's conversion must reproduce the committed file.
    boards = agreement_boards(DEFAULT_SOURCE)
    calibration_end = DEFAULT_CALIBRATION_BOARDS
    return boards[:calibration_end], boards[calibration_end : calibration_end + CHECK_BOARDS]


@pytest.fixture(scope="module")
def converted(tmp_path_factory, boards):
    output = tmp_path_factory.mktemp("fp16") / "model.fp16.onnx"
    model = convert(DEFAULT_SOURCE, output, boards[0])
    return model, output


@pytest.fixture(scope="module")
def outputs(converted, boards):
    images, geometry = load_boards(boards[1])
    reference = run_in_batches(onnxruntime_runner(DEFAULT_SOURCE), images, 4, "FP32")
    candidate = run_in_batches(onnxruntime_runner(converted[1]), images, 4, "FP16")
    return reference, candidate, geometry


def io_signature(model: onnx.ModelProto):
    return [
        (value.name, value.type.tensor_type.elem_type, [d.dim_value or d.dim_param for d in value.type.tensor_type.shape.dim])
        for value in list(model.graph.input) + list(model.graph.output)
    ]


def test_inputs_and_outputs_keep_their_names_types_and_shapes(converted):
    """The served pixel type in (uint8, straight into a Cast as TensorRT requires), float32 detections out."""
    source = onnx.load(str(DEFAULT_SOURCE))
    assert io_signature(converted[0]) == io_signature(source)
    assert [elem for _, elem, _ in io_signature(converted[0])] == [onnx.TensorProto.UINT8, FP32]
    (first,) = [node for node in converted[0].graph.node if source.graph.input[0].name in node.input]
    assert first.op_type == "Cast"


def test_feature_layers_run_in_fp16_and_the_decode_tail_in_fp32(converted):
    model = converted[0]
    precisions = node_precisions(model)
    tail = set(decode_tail(onnx.load(str(DEFAULT_SOURCE))))
    ops = {node.name: node.op_type for node in model.graph.node}
    feature_weights = [name for name, op in ops.items() if op in WEIGHT_OPS and name not in tail]
    assert feature_weights, "the detector has no feature layers before its output layers"
    assert {precisions[name] for name in feature_weights} == {FP16}
    tail_float_nodes = [name for name in tail if name in precisions]
    assert any(ops[name] in WEIGHT_OPS for name in tail_float_nodes)  # the output convolutions are in the tail
    assert {precisions[name] for name in tail_float_nodes} == {FP32}
    producer = next(node for node in model.graph.node if "output0" in node.output)
    assert producer.op_type == "Cast" or precisions[producer.name] == FP32


def test_raw_outputs_agree_within_tolerance_without_nan_or_inf(outputs):
    reference, candidate, geometry = outputs
    verdict = compare_outputs(reference, candidate, geometry)
    boxes, scores = verdict.raw
    assert boxes.passed, boxes.line()
    assert scores.passed, scores.line()
    assert np.isfinite(candidate).all()


def test_detections_agree_with_fp32(outputs):
    reference, candidate, geometry = outputs
    detections = compare_outputs(reference, candidate, geometry).detections
    assert detections.reference_detections > 0, "no detections to compare: the check would be empty"
    assert detections.passed, detections.line()


def test_converted_model_records_its_source(converted):
    metadata = {prop.key: prop.value for prop in converted[0].metadata_props}
    assert metadata[SOURCE_HASH_KEY] == file_sha256(DEFAULT_SOURCE)


def test_committed_fp16_model_was_made_from_the_committed_fp32_model():
    committed = onnx.load(str(DEFAULT_OUTPUT), load_external_data=False)
    metadata = {prop.key: prop.value for prop in committed.metadata_props}
    assert metadata.get(SOURCE_HASH_KEY) == file_sha256(DEFAULT_SOURCE), (
        f"{DEFAULT_OUTPUT.name} is stale: regenerate it with `python -m tools.engine.fp16`"
    )


def test_conversion_is_reproducible(converted):
    assert converted[1].read_bytes() == DEFAULT_OUTPUT.read_bytes(), (
        f"converting {DEFAULT_SOURCE.name} again gave a different {DEFAULT_OUTPUT.name}: "
        "regenerate it with `python -m tools.engine.fp16` (same package pins as requirements/gpu-tools.txt)"
    )
