"""Make the FP16 mixed-precision detector that TensorRT engines are built from, and check it against FP32.

    python -m tools.engine.fp16                      # models/pcb_defect_detector/1/model.onnx -> model.fp16.onnx

TensorRT 11 builds only strongly typed networks: the precision of every layer is the one written in the ONNX
graph, so FP16 has to be put into the graph before the engine build. NVIDIA ModelOpt AutoCast does that
(it runs on CPU): it converts nodes to FP16 and inserts the casts, and keeps in FP32 the nodes whose values,
measured on calibration data, exceed ``data_max`` (FP16 holds at most 65504 and has 11 significant bits).

On top of AutoCast's own rule this tool keeps the whole decode tail in FP32: the output convolutions and
every node after them (exp/softplus/sigmoid, grid offsets, stride scaling, concat). Box coordinates there reach 640
pixels, where FP16's spacing is 0.5 px, and widths times heights reach 640 * 640, beyond FP16's range; the
tail is cheap element-wise work, so FP32 costs nothing that matters. The input (uint8 grey levels, which
the graph's first Cast takes, as TensorRT requires of a uint8 input) and the float32 output keep their types
(``keep_io_types``), so the engine is a drop-in replacement in the Triton model configuration.

Calibration uses real boards (DeepPCB images, ``tools.data.splits.agreement_boards``, preprocessed by the
served ``preprocess_image``); a disjoint set of boards then checks the FP16 graph against FP32 with ONNX
Runtime, raw outputs and detections, and the tool exits non-zero if they disagree. The output records its
source model's SHA-256, the calibration boards and the AutoCast version in its metadata, so it can be
reproduced and checked for staleness against ``model.onnx``.
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import re
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path

import numpy as np
import onnx

from tools.contract import served_contract
from tools.data.board_batches import calibration_inputs, load_mixed_boards
from tools.data.deeppcb import DEFAULT_ROOT
from tools.data.splits import agreement_boards
from tools.engine.agreement import compare_outputs, onnxruntime_runner, run_in_batches

DEFAULT_SOURCE = served_contract().detector_onnx
DEFAULT_OUTPUT = DEFAULT_SOURCE.with_name("model.fp16.onnx")

# Layers that carry learned weights; everything downstream of the last of them is decoding arithmetic.
WEIGHT_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
# AutoCast keeps a node in FP32 when its calibrated values exceed this (its documented default).
DATA_MAX = 512.0
DEFAULT_CALIBRATION_BOARDS = 32
DEFAULT_CHECK_BOARDS = 32
SOURCE_HASH_KEY = "fp16_source_sha256"
CALIBRATION_KEY = "fp16_calibration_boards"
CONVERTER_KEY = "fp16_converter"


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def name_unnamed_nodes(model: onnx.ModelProto) -> None:
    """Give every node a unique name: AutoCast selects nodes to keep in FP32 by name."""
    taken = {node.name for node in model.graph.node if node.name}
    for index, node in enumerate(model.graph.node):
        if not node.name:
            name = f"{node.op_type}_autonamed_{index}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)


def decode_tail(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes from which no further weight layer can be reached: the output layers and the decoding."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for tensor in node.input:
            consumers.setdefault(tensor, []).append(node)
    # Nodes are topologically sorted in a valid ONNX graph, so walking backwards sees consumers first.
    reaches_weights: dict[str, bool] = {}
    for node in reversed(model.graph.node):
        reaches_weights[node.name] = any(
            consumer.op_type in WEIGHT_OPS or reaches_weights.get(consumer.name, False)
            for tensor in node.output
            for consumer in consumers.get(tensor, [])
        )
    return [node.name for node in model.graph.node if not reaches_weights[node.name]]


def node_precisions(model: onnx.ModelProto) -> dict[str, int]:
    """Floating-point type (onnx.TensorProto.FLOAT / FLOAT16) each non-Cast node computes in, by node name.

    A node's precision is the type of its floating-point outputs; nodes with only integer or boolean outputs
    (shape arithmetic) are left out, and so are Casts, which sit between precisions.
    """
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {
        value.name: value.type.tensor_type.elem_type
        for value in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)
    }
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
    precisions = {}
    for node in inferred.graph.node:
        if node.op_type == "Cast":
            continue
        output_types = {types.get(tensor) for tensor in node.output} & set(floats)
        if len(output_types) == 1:
            precisions[node.name] = output_types.pop()
    return precisions


def write_calibration(images: np.ndarray, input_name: str, folder: Path, batch_size: int) -> None:
    """One .npz per batch: AutoCast reads a folder of them and pools the value ranges over all batches."""
    for index, start in enumerate(range(0, len(images), batch_size)):
        np.savez(folder / f"batch_{index:04d}.npz", **{input_name: images[start : start + batch_size]})


def convert(source: Path, output: Path, calibration_boards: list[Path], batch_size: int = 4) -> onnx.ModelProto:
    """Write the FP16 mixed-precision model of ``source`` to ``output`` and return it."""
    # Imported here: ModelOpt is a conversion-time dependency, not needed to read or check converted models.
    from modelopt.onnx.autocast import convert_to_mixed_precision
    from modelopt.onnx.autocast.logging_config import configure_logging

    configure_logging(logging.WARNING)
    model = onnx.load(str(source))
    name_unnamed_nodes(model)
    keep_fp32 = decode_tail(model)
    images = calibration_inputs(calibration_boards)
    with tempfile.TemporaryDirectory() as tmp:
        named = Path(tmp) / "named.onnx"
        onnx.save(model, str(named))
        calibration = Path(tmp) / "calibration"
        calibration.mkdir()
        write_calibration(images, model.graph.input[0].name, calibration, batch_size)
        converted = convert_to_mixed_precision(
            onnx_path=str(named),
            low_precision_type="fp16",
            nodes_to_exclude=[f"^{re.escape(name)}$" for name in keep_fp32],
            data_max=DATA_MAX,
            keep_io_types=True,
            calibration_data=str(calibration),
            providers=["cpu"],
        )
    save_with_provenance(converted, output, {
        SOURCE_HASH_KEY: file_sha256(source),
        CALIBRATION_KEY: calibration_description(calibration_boards),
        CONVERTER_KEY: f"nvidia-modelopt {version('nvidia-modelopt')} AutoCast fp16, keep_io_types, "
        f"data_max {DATA_MAX:g}, decode tail in FP32",
    })
    return converted


def calibration_description(boards: list[Path]) -> str:
    """'32 boards, names sha256 ...': which boards calibrated a build, checkable without their paths."""
    names = "\n".join(sorted(path.name for path in boards))
    return f"{len(boards)} boards, names sha256 " + hashlib.sha256(names.encode()).hexdigest()


def save_with_provenance(converted: onnx.ModelProto, output: Path, provenance: dict[str, str]) -> None:
    """Add ``provenance`` to the converted model's metadata, check the model and write it to ``output``."""
    onnx.helper.set_model_props(converted, {**{p.key: p.value for p in converted.metadata_props}, **provenance})
    onnx.checker.check_model(converted)
    output.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(converted, str(output))


def precision_summary(model: onnx.ModelProto) -> str:
    """'Conv: 8 fp16; Exp: 3 fp32 ...' by op type."""
    ops = {node.name: node.op_type for node in model.graph.node}
    counts: dict[tuple[str, str], int] = {}
    for name, precision in node_precisions(model).items():
        key = (ops[name], "fp16" if precision == onnx.TensorProto.FLOAT16 else "fp32")
        counts[key] = counts.get(key, 0) + 1
    return "; ".join(f"{op}: {n} {p}" for (op, p), n in sorted(counts.items()))


def add_conversion_arguments(parser: argparse.ArgumentParser, default_output: Path, precision: str) -> None:
    """--source, --output, --data, --calibration-boards, --check-boards, --batch-size (FP16 and INT8 builds)."""
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="FP32 ONNX detector")
    parser.add_argument("--output", type=Path, default=default_output, help=f"where to write the {precision} ONNX")
    parser.add_argument("--data", type=Path, default=DEFAULT_ROOT, help="DeepPCB folder (boards for calibration/check)")
    parser.add_argument("--calibration-boards", type=int, default=DEFAULT_CALIBRATION_BOARDS)
    parser.add_argument(
        "--check-boards", type=int, default=DEFAULT_CHECK_BOARDS, help="further boards, disjoint from calibration"
    )
    parser.add_argument("--batch-size", type=int, default=4)


def conversion_boards(args: argparse.Namespace) -> tuple[list[Path], list[Path]]:
    """(calibration boards, check boards): disjoint, and boards the detector never saw where it has any
    (``agreement_boards``)."""
    boards = agreement_boards(args.source, args.data)
    wanted = args.calibration_boards + args.check_boards
    if len(boards) < wanted:
        raise SystemExit(f"{args.data} has {len(boards)} boards to calibrate and check on, {wanted} needed")
    return boards[: args.calibration_boards], boards[args.calibration_boards : wanted]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_conversion_arguments(parser, DEFAULT_OUTPUT, "FP16")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    calibration, check = conversion_boards(args)
    converted = convert(args.source, args.output, calibration, args.batch_size)
    print(f"wrote {args.output} ({args.output.stat().st_size / 1e6:.2f} MB)")
    print(f"node precisions: {precision_summary(converted)}")
    images, geometry = load_mixed_boards(check)  # with and without templates
    reference = run_in_batches(onnxruntime_runner(args.source), images, args.batch_size, "FP32 ONNX Runtime")
    candidate = run_in_batches(onnxruntime_runner(args.output), images, args.batch_size, "FP16 ONNX Runtime")
    verdict = compare_outputs(reference, candidate, geometry)
    print("\n".join(verdict.lines()))
    return 0 if verdict.passed else 1


if __name__ == "__main__":
    sys.exit(main())
