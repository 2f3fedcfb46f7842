"""Check a built TensorRT engine against the FP32 ONNX model on real boards; exit non-zero if it is wrong.

    python -m tools.engine.validate            # models/pcb_defect_detector/1/model.plan vs model.onnx

The engine runs through polygraphy's TrtRunner on the GPU, the reference through ONNX Runtime on the CPU, both
on the same DeepPCB boards (``tools.data.splits.agreement_boards``) preprocessed by the served
``preprocess_image``. The comparison is ``tools.engine.agreement``, the same checks that gate the FP16 ONNX
model on CPU: no NaN/Inf, raw outputs within tolerance, and the served postprocess giving the same detections
(class, box IoU, score drift). Like ``tools.engine.build`` it needs a GPU and TensorRT: run it in the
engine-builder image (docs/gpu.md).
"""
from __future__ import annotations

import argparse
import sys
from contextlib import contextmanager
from pathlib import Path

from tools.contract import served_contract
from tools.data.board_batches import load_mixed_boards
from tools.data.deeppcb import DEFAULT_ROOT
from tools.data.splits import agreement_boards
from tools.engine.agreement import (
    DEFAULT_ATOL,
    DEFAULT_MAX_SCORE_DRIFT,
    DEFAULT_MIN_IOU,
    DEFAULT_RTOL,
    compare_outputs,
    onnxruntime_runner,
    run_in_batches,
)
from tools.engine.build import DEFAULT_ENGINE, MissingRequirement, first_visible_device, import_tensorrt, query_gpu

DEFAULT_REFERENCE = served_contract().detector_onnx


@contextmanager
def tensorrt_runner(engine_path: Path):
    """A Runner (images -> output0) over the engine, alive for the ``with`` block."""
    import_tensorrt()
    query_gpu(first_visible_device())
    from polygraphy.backend.common import BytesFromPath
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    with TrtRunner(EngineFromBytes(BytesFromPath(str(engine_path)))) as runner:
        input_name = next(iter(runner.get_input_metadata()))
        output_name = served_contract().detector_output
        yield lambda images: runner.infer({input_name: images})[output_name]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", type=Path, default=DEFAULT_ENGINE)
    parser.add_argument("--reference", type=Path, default=DEFAULT_REFERENCE, help="FP32 ONNX model")
    parser.add_argument("--data", type=Path, default=DEFAULT_ROOT, help="DeepPCB folder")
    parser.add_argument("--boards", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--atol", type=float, default=DEFAULT_ATOL)
    parser.add_argument("--rtol", type=float, default=DEFAULT_RTOL)
    parser.add_argument("--min-iou", type=float, default=DEFAULT_MIN_IOU)
    parser.add_argument("--max-score-drift", type=float, default=DEFAULT_MAX_SCORE_DRIFT)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    boards = agreement_boards(args.reference, args.data)[: args.boards]
    images, geometry = load_mixed_boards(boards)  # with and without templates
    reference = run_in_batches(onnxruntime_runner(args.reference), images, args.batch_size, "FP32 ONNX Runtime")
    try:
        with tensorrt_runner(args.engine) as engine:
            candidate = run_in_batches(engine, images, args.batch_size, "TensorRT engine")
    except MissingRequirement as missing:
        print(f"cannot run the TensorRT engine: {missing}", file=sys.stderr)
        return 2
    verdict = compare_outputs(
        reference,
        candidate,
        geometry,
        atol=args.atol,
        rtol=args.rtol,
        min_iou=args.min_iou,
        max_score_drift=args.max_score_drift,
    )
    print(f"{args.engine} vs {args.reference} on {len(images)} boards:")
    print("\n".join(verdict.lines()))
    return 0 if verdict.passed else 1


if __name__ == "__main__":
    sys.exit(main())
