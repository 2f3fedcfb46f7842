"""Export trained detector weights to ONNX in the YOLO export convention and check the export with ONNX Runtime.

    python -m tools.train.export --weights runs/detector/detector.pt --out models/pcb_defect_detector/1/model.onnx

The graph has the served detector's input (``images`` [B, C, H, W], dynamic batch, of the served pixel type:
uint8 grey levels, which the graph's first nodes cast and divide by 255 as training did, or float in [0, 1]) and
output (``output0`` [B, 4 + num_classes, N]: cx, cy, w, h in input pixels, then sigmoid class scores), named
and sized as the configs say (tools.contract). The training split travels into the metadata. Before writing,
the ONNX Runtime outputs are compared with PyTorch's on DeepPCB boards (``tools.data.splits.agreement_boards``).
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

from tools.contract import served_contract
from tools.data.board_batches import load_boards
from tools.data.deeppcb import CLASS_NAMES, DEFAULT_ROOT
from tools.data.splits import METADATA_KEY, agreement_boards
from tools.train.network import STRIDE, PcbDefectDetector

OPSET = 17
CONTRACT = served_contract()
DEFAULT_OUT = CONTRACT.detector_onnx


def load_detector(weights: Path) -> tuple[PcbDefectDetector, str]:
    """The trained network and the split record of its training run."""
    checkpoint = torch.load(weights, weights_only=False)
    model = PcbDefectDetector(num_classes=len(CLASS_NAMES), in_channels=CONTRACT.channels)
    model.load_state_dict(checkpoint["weights"])  # refuses weights trained for another channel count
    if "validation_split" not in checkpoint:
        raise ValueError(f"{weights} records no validation split: retrain it with tools.train")
    return model.eval(), checkpoint["validation_split"]


class ServedPixels(torch.nn.Module):
    """The network behind the served pixel type: uint8 grey levels are cast and scaled to [0, 1] in the graph
    (the float the network trained on), so preprocess sends a quarter of the bytes; float passes through."""

    def __init__(self, network: PcbDefectDetector):
        super().__init__()
        self.network = network

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype == torch.uint8:
            images = images.to(torch.float32) / 255
        return self.network(images)


def export(model: PcbDefectDetector, split_record: str, out: Path) -> None:
    size = CONTRACT.input_size
    example = torch.zeros(1, model.in_channels, size, size, dtype=getattr(torch, CONTRACT.pixel_type.name))
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "model.onnx"
        torch.onnx.export(
            ServedPixels(model).eval(),  # export restores the mode it found: eval, as the network is
            (example,),
            str(raw),
            dynamo=False,
            opset_version=OPSET,
            input_names=[CONTRACT.detector_input],
            output_names=[CONTRACT.detector_output],
            dynamic_axes={CONTRACT.detector_input: {0: "batch"}, CONTRACT.detector_output: {0: "batch"}},
        )
        graph = onnx.load(str(raw))
    # The exporter leaves the output's channel and anchor dims symbolic; declare them so Triton configs and
    # TensorRT see the fixed [batch, 4 + C, N] shape (the full check below verifies it against inference).
    anchors = (size // STRIDE) ** 2
    for dim, value in zip(graph.graph.output[0].type.tensor_type.shape.dim[1:], (4 + model.num_classes, anchors)):
        dim.Clear()
        dim.dim_value = value
    # Ultralytics-style metadata, so tools that know that convention read the classes and geometry.
    metadata = {
        "names": json.dumps(dict(enumerate(CLASS_NAMES))),
        "imgsz": json.dumps([size, size]),
        "stride": str(STRIDE),
        "channels": str(model.in_channels),
        "description": "PCB defect detector trained on DeepPCB trainval (see MODEL_CARD.md)",
        METADATA_KEY: split_record,
    }
    onnx.helper.set_model_props(graph, metadata)
    onnx.checker.check_model(graph, full_check=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(graph, str(out))


def check_against_torch(model: PcbDefectDetector, onnx_path: Path, images: np.ndarray, atol: float = 1e-3) -> float:
    """Largest absolute difference between ONNX Runtime and PyTorch outputs; raises if above atol."""
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    onnx_out = session.run([CONTRACT.detector_output], {CONTRACT.detector_input: images})[0]
    with torch.no_grad():
        torch_out = ServedPixels(model)(torch.from_numpy(images)).numpy()
    worst = float(np.abs(onnx_out - torch_out).max())
    if worst > atol:
        raise RuntimeError(f"ONNX Runtime output differs from PyTorch by {worst:.2e} (> {atol:.0e})")
    return worst


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default="runs/detector/detector.pt", type=Path)
    parser.add_argument("--out", default=DEFAULT_OUT, type=Path)
    parser.add_argument("--data", default=DEFAULT_ROOT, type=Path, help="DeepPCB folder; boards for the check")
    parser.add_argument("--check-images", type=int, default=4)
    args = parser.parse_args(argv)
    model, split_record = load_detector(args.weights)
    export(model, split_record, args.out)
    boards, _ = load_boards(agreement_boards(args.out, args.data)[: args.check_images])
    worst = check_against_torch(model, args.out, boards)
    size_mb = args.out.stat().st_size / 1e6
    print(f"wrote {args.out} ({size_mb:.2f} MB, opset {OPSET}); ONNX Runtime vs PyTorch max |diff| {worst:.2e}")


if __name__ == "__main__":
    main()
