"""tools.eval.evaluate: report writing on a hand-made case (no server), and one run against the live pipeline."""

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from tools.client.pipeline_client import PipelineClient
from tools.contract import served_contract
from tools.data.deeppcb import Sample, read_split
from tools.data.splits import ValidationSplit, select_samples
from tools.detections import Detections
from tools.eval.evaluate import main
from tools.eval.report import EvaluationSetup, write_report

CLASS_NAMES = served_contract().labels
OPEN, SHORT, SPUR, COPPER = (CLASS_NAMES.index(n) for n in ("open", "short", "spur", "copper"))


def board(tmp_path: Path, name: str, boxes, classes) -> Sample:
    """A white 100x100 board with black defect boxes, saved as a JPEG like DeepPCB's."""
    image = np.full((100, 100), 255, np.uint8)
    for x1, y1, x2, y2 in boxes:
        image[y1:y2, x1:x2] = 0
    path = tmp_path / f"{name}_test.jpg"
    cv2.imwrite(str(path), image)
    return Sample(
        path,
        tmp_path / f"{name}_temp.jpg",
        tmp_path / f"{name}.txt",
        np.array(boxes, np.float32).reshape(-1, 4),
        np.array(classes, np.int64),
    )


def setup(deployed_score_threshold: float) -> EvaluationSetup:
    return EvaluationSetup(
        data="synthetic",
        list="test.txt",
        split="all",
        val_fraction=0.15,
        split_seed=0,
        url="none",
        model="pcb_pipeline",
        request_score_threshold=0.001,
        deployed_score_threshold=deployed_score_threshold,
        config="none",
    )


detections = Detections.of


def test_write_report_on_a_hand_computed_case(tmp_path):
    # Board A: an open and a short. The pipeline finds the open (0.9), finds the short only at 0.2 (below the
    # deployed 0.5) and reports a spur (0.6) on bare board. Board B: a copper, found at 0.8.
    # Detections of A are given out of score order on purpose: the evaluator ranks them.
    a = board(tmp_path, "a", [[10, 10, 30, 30], [40, 40, 60, 60]], [OPEN, SHORT])
    b = board(tmp_path, "b", [[5, 5, 25, 25]], [COPPER])
    found = [
        detections([[40, 40, 60, 60], [10, 10, 30, 30], [70, 70, 80, 80]], [0.2, 0.9, 0.6], [SHORT, OPEN, SPUR]),
        detections([[5, 5, 25, 25]], [0.8], [COPPER]),
    ]
    report = write_report([a, b], found, setup(0.5), CLASS_NAMES, tmp_path / "out")

    # Pooled ranking: 0.9 TP, 0.8 TP, 0.6 FP, 0.2 TP over 3 defects; precision 1, 1, 2/3, 3/4.
    # DeepPCB AP = (1 + 1 + 3/4) / 3 = 11/12. Above 0.5: TP 2, FP 1, FN 1 -> P = R = F = 2/3.
    # VOC: open, short and copper each have one detection, correct -> AP 1 each, mAP 1 (spur has no defect).
    metrics = report["metrics"]
    assert metrics["deeppcb"]["ap"] == pytest.approx(11 / 12)
    at = metrics["deeppcb"]["at_threshold"]
    assert (at["true_positives"], at["false_positives"], at["false_negatives"]) == (2, 1, 1)
    assert at["f_score"] == pytest.approx(2 / 3)
    assert metrics["voc"]["map50"] == pytest.approx(1.0)
    assert metrics["per_class"]["spur"]["at_threshold"]["false_positives"] == 1

    # Only board A has a miss (the short) and a false alarm (the spur): it is the one example.
    assert report["examples"] == [
        {
            "image": str(a.image_path),
            "file": "examples/a_test.png",
            "missed": ["short"],
            "false_alarms": [{"class": "spur", "score": 0.6}],
        }
    ]
    out = tmp_path / "out"
    assert json.loads((out / "report.json").read_text())["metrics"] == json.loads(json.dumps(metrics))
    example = cv2.imread(str(out / "examples" / "a_test.png"))
    assert example.shape == (100, 100, 3)
    # Yellow corner brackets: the missed short's 4 px outside its box (thick), the found open's 2 px outside.
    assert example[36, 40].tolist() == [0, 255, 255] and example[8, 12].tolist() == [0, 255, 255]
    assert cv2.imread(str(out / "precision_recall.png")) is not None
    text = (out / "report.md").read_text()
    assert "| DeepPCB AP (IoU > 0.33, uninterpolated, pooled) | 91.67 % |" in text
    assert "a_test.jpg`: 1 missed (short), 1 false alarms (spur)." in text
    assert "![a_test](examples/a_test.png)" in text


def test_write_report_refuses_mismatched_inputs(tmp_path):
    a = board(tmp_path, "a", [[10, 10, 30, 30]], [OPEN])
    with pytest.raises(ValueError, match="1 boards but 0 detection sets"):
        write_report([a], [], setup(0.5), CLASS_NAMES, tmp_path / "out")


def dataset_root(samples: list[Sample]) -> Path:
    """The DeepPCB-format folder the samples were read from: the nearest parent holding test.txt."""
    return next(p for p in Path(samples[0].image_path).parents if (p / "test.txt").is_file())


def test_val_split_is_the_training_split_carve_out(synthetic_boards):
    root = dataset_root(synthetic_boards)
    _, val = ValidationSplit(0.5, 0).divide(read_split(root, "test.txt"))
    chosen = select_samples(root, "test.txt", "val", ValidationSplit(0.5, 0))
    assert [s.image_path for s in chosen] == [s.image_path for s in val] and len(chosen) == len(synthetic_boards) // 2


def test_live_pipeline_report_is_consistent(triton_server, synthetic_boards, tmp_path):
    root, out = dataset_root(synthetic_boards), tmp_path / "eval"
    args = ["--data", str(root), "--list", "test.txt", "--split", "val", "--val-fraction", "0.5", "--split-seed", "0"]
    report = main([*args, "--url", triton_server.grpc_url, "--out", str(out), "--examples", "2"])
    boards = select_samples(root, "test.txt", "val", ValidationSplit(0.5, 0))
    metrics, threshold = report["metrics"], report["setup"]["deployed_score_threshold"]
    assert metrics["images"] == len(boards) and metrics["ground_truths"] == sum(len(s.classes) for s in boards)
    at = metrics["deeppcb"]["at_threshold"]
    assert at["true_positives"] + at["false_negatives"] == metrics["ground_truths"]
    assert 0.0 <= metrics["deeppcb"]["ap"] <= 1.0 and 0.0 <= metrics["voc"]["map50"] <= 1.0
    # Filtering the low-threshold answers client-side must keep exactly what the server keeps by default.
    with PipelineClient(url=triton_server.grpc_url) as client:
        deployed = client.infer_files([s.image_path for s in boards], progress=False)
    assert at["true_positives"] + at["false_positives"] == sum(len(d.scores) for d in deployed)
    assert all((d.scores > np.float32(threshold)).all() for d in deployed)
    for name in ("report.md", "report.json", "precision_recall.png"):
        assert (out / name).is_file()
    assert all((out / e["file"]).is_file() for e in report["examples"])
