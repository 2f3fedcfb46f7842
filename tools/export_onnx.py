"""Export trained detector weights to ONNX in the YOLO export convention and check the export with ONNX Runtime.

    python -m tools.export_onnx --weights runs/detector/detector.pt --out models/pcb_defect_detector/1/model.onnx

The graph has input ``images`` [B,1,640,640] (float in [0,1], dynamic batch) and output ``output0``
[B, 4 + num_classes, N] (cx, cy, w, h in input pixels, then sigmoid class scores). Before writing, the ONNX
Runtime outputs are compared with PyTorch's on real boards.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from tools.board_batches import held_out_boards, load_boards
from tools.deeppcb import CLASS_NAMES, DEFAULT_ROOT
from tools.detector_net import STRIDE, PcbDefectDetector

INPUT_SIZE = 640
OPSET = 17
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "models" / "pcb_defect_detector" / "1" / "model.onnx"


def load_detector(weights: Path) -> PcbDefectDetector:
    model = PcbDefectDetector(num_classes=len(CLASS_NAMES))
    model.load_state_dict(torch.load(weights, weights_only=False)["weights"])
    return model.eval()


def export(model: PcbDefectDetector, out: Path) -> None:
    example = torch.zeros(1, model.in_channels, INPUT_SIZE, INPUT_SIZE)
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "model.onnx"
        torch.onnx.export(
            model,
            (example,),
            str(raw),
            dynamo=False,
            opset_version=OPSET,
            input_names=["images"],
            output_names=["output0"],
            dynamic_axes={"images": {0: "batch"}, "output0": {0: "batch"}},
        )
        graph = onnx.load(str(raw))
    # The exporter leaves the output's channel and anchor dims symbolic; declare them so Triton configs and
    # TensorRT see the fixed [batch, 4 + C, N] shape (the full check below verifies it against inference).
    anchors = (INPUT_SIZE // STRIDE) ** 2
    for dim, value in zip(graph.graph.output[0].type.tensor_type.shape.dim[1:], (4 + model.num_classes, anchors)):
        dim.Clear()
        dim.dim_value = value
    # Ultralytics-style metadata, so tools that know that convention read the classes and geometry.
    metadata = {
        "names": json.dumps(dict(enumerate(CLASS_NAMES))),
        "imgsz": json.dumps([INPUT_SIZE, INPUT_SIZE]),
        "stride": str(STRIDE),
        "channels": str(model.in_channels),
        "description": "PCB defect detector trained on DeepPCB trainval (see MODEL_CARD.md)",
    }
    onnx.helper.set_model_props(graph, metadata)
    onnx.checker.check_model(graph, full_check=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(graph, str(out))


def check_against_torch(model: PcbDefectDetector, onnx_path: Path, images: np.ndarray, atol: float = 1e-3) -> float:
    """Largest absolute difference between ONNX Runtime and PyTorch outputs; raises if above atol."""
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    onnx_out = session.run(["output0"], {"images": images})[0]
    with torch.no_grad():
        torch_out = model(torch.from_numpy(images)).numpy()
    worst = float(np.abs(onnx_out - torch_out).max())
    if worst > atol:
        raise RuntimeError(f"ONNX Runtime output differs from PyTorch by {worst:.2e} (> {atol:.0e})")
    return worst


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default="runs/detector/detector.pt", type=Path)
    parser.add_argument("--out", default=DEFAULT_OUT, type=Path)
    parser.add_argument("--data", default=DEFAULT_ROOT, type=Path, help="DeepPCB folder; held-out boards for the check")
    parser.add_argument("--check-images", type=int, default=4)
    args = parser.parse_args(argv)
    model = load_detector(args.weights)
    export(model, args.out)
    boards, _ = load_boards(held_out_boards(args.data)[: args.check_images])
    worst = check_against_torch(model, args.out, boards)
    size_mb = args.out.stat().st_size / 1e6
    print(f"wrote {args.out} ({size_mb:.2f} MB, opset {OPSET}); ONNX Runtime vs PyTorch max |diff| {worst:.2e}")


if __name__ == "__main__":
    main()
