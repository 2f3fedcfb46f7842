"""tools.eval.evaluate: report writing on a hand-made case (no server), and one run against the live pipeline."""

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from tools.client.pipeline_client import PipelineClient
from tools.contract import MODELS_ROOT, served_contract
from tools.data.deeppcb import Sample, read_split
from tools.data.misregistration import Misregistration
from tools.data.splits import HELD_OUT_GROUPS_DETECTOR, ValidationSplit, select_samples
from tools.detections import Detections
from tools.eval.evaluate import expected_registrations, main
from tools.eval.report import EvaluationSetup, registration_summary, write_report
from tools.pipeline_math import tiling
from tools.serve.repository_copy import repository_with_detector

CLASS_NAMES = served_contract().labels
OPEN, SHORT, MOUSEBITE, SPUR, COPPER = (CLASS_NAMES.index(n) for n in ("open", "short", "mousebite", "spur", "copper"))


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
        val_groups=(),
        url="none",
        model="pcb_pipeline",
        request_score_threshold=0.001,
        deployed_score_threshold=deployed_score_threshold,
        deployed_template_score_threshold=deployed_score_threshold,
        config="none",
        detector="none",
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
    # No detection has the wrong class here, so regardless of class the figures are the same.
    assert "| regardless of class (where the defects are): DeepPCB AP / F-score | 91.67 % / 66.67 % |" in text
    assert "a_test.jpg`: 1 missed (short), 1 false alarms (spur)." in text
    assert "![a_test](examples/a_test.png)" in text


def test_the_report_gives_each_design_its_own_figures(tmp_path):
    # Design A: an open found as a mousebite (0.9). Design B: a short found (0.8). At 0.5, A: 0 / 1 / 1 and AP 0,
    # but regardless of class A is found (AP 1, F 1); B: 1 / 0 / 0 either way.
    for group in ("groupA", "groupB"):
        (tmp_path / group / "boards").mkdir(parents=True)
    a = board(tmp_path / "groupA" / "boards", "a", [[10, 10, 30, 30]], [OPEN])
    b = board(tmp_path / "groupB" / "boards", "b", [[40, 40, 60, 60]], [SHORT])
    found = [detections([[10, 10, 30, 30]], [0.9], [MOUSEBITE]), detections([[40, 40, 60, 60]], [0.8], [SHORT])]
    report = write_report([a, b], found, setup(0.5), CLASS_NAMES, tmp_path / "out")
    design_a, design_b = report["per_design"]["groupA"], report["per_design"]["groupB"]
    assert design_a["deeppcb"]["ap"] == 0.0 and design_a["deeppcb_regardless_of_class"]["ap"] == pytest.approx(1.0)
    at = design_a["deeppcb"]["at_threshold"]
    assert (at["true_positives"], at["false_positives"], at["false_negatives"]) == (0, 1, 1)
    assert design_b["deeppcb"]["at_threshold"]["f_score"] == pytest.approx(1.0)
    text = (tmp_path / "out" / "report.md").read_text()
    assert "| groupA | 1 | 1 | 0.00 % | 0.00 % | 0 / 1 / 1 | 100.00 % / 100.00 % |" in text
    assert "| groupB | 1 | 1 | 100.00 % | 100.00 % | 1 / 0 / 0 | 100.00 % / 100.00 % |" in text


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
    args = ["--data", str(root), "--list", "test.txt", "--split", "val", "--val-groups", "--val-fraction", "0.5",
            "--split-seed", "0"]  # no groups: a random half
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


def test_registration_summary_on_a_hand_made_case(tmp_path):
    a = board(tmp_path, "a", [[10, 10, 30, 30]], [OPEN])
    b = board(tmp_path, "b", [[5, 5, 25, 25]], [COPPER])
    found = [detections([[10, 10, 30, 30]], [0.9], [OPEN], [3.0, 4.0, 0.5, 0.9]), detections([], [], [])]
    summary = registration_summary([a, b], found, expected=[[[0.0, 0.0, 0.25]], [[1.0, 1.0, 0.0]]],
                                   refused={str(b.image_path): "TEMPLATE[0]: template does not match"})
    assert summary["registered"] == 1 and summary["score"]["min"] == pytest.approx(0.9)
    assert summary["error"]["shift_px"]["max"] == pytest.approx(5.0)  # |(3, 4) - (0, 0)|
    assert summary["error"]["angle_deg"]["mean"] == pytest.approx(0.25)
    assert summary["refused"] == [{"image": str(b.image_path), "error": "TEMPLATE[0]: template does not match"}]
    report = write_report([a, b], found, setup(0.5), CLASS_NAMES, tmp_path / "out", registration=summary)
    text = (tmp_path / "out" / "report.md").read_text()
    assert "## Registration of the templates" in text and "| shift error against the known drift (px) |" in text
    assert report["registration"]["boards"][0]["shift_error_px"] == [5.0]


def test_expected_registrations_of_one_window_are_the_drifts():
    drift = Misregistration(12.0, -7.0, 0.8)
    (row,) = expected_registrations(drift, 640, 480, [tiling.Window(0, 0, 640, 480)])
    np.testing.assert_allclose(row, drift.expected_registration(640, 480), atol=1e-9)


def test_live_evaluation_with_templates_reports_the_registrations(triton_server, synthetic_boards, tmp_path):
    root = dataset_root(synthetic_boards)
    args = ["--data", str(root), "--list", "test.txt", "--limit", "2", "--url", triton_server.grpc_url,
            "--examples", "1", "--with-templates"]
    report = main([*args, "--out", str(tmp_path / "as_given")])
    registration = report["registration"]
    assert report["setup"]["templates"] == "as given" and report["metrics"]["images"] == 2
    assert registration["registered"] == 2 and not registration["refused"]
    assert registration["score"]["min"] >= served_contract().registration_parameters["registration_min_score"]
    assert set(report["metrics"]["per_class"]) == set(CLASS_NAMES)
    assert "## Registration of the templates" in (tmp_path / "as_given" / "report.md").read_text()

    moved = main([*args, "--misregister-shift", "20", "--misregister-angle", "0.5", "--misregister-seed", "3",
                  "--out", str(tmp_path / "moved")])
    assert moved["setup"]["templates"] == "misregistered" and moved["setup"]["misregister_shift"] == 20
    rng = np.random.default_rng(3)
    for record in moved["registration"]["boards"]:  # the drift drawn for each board, in board order
        drift = Misregistration.random(rng, 20, 0.5)
        np.testing.assert_allclose(record["expected"][0], drift.expected_registration(640, 640), atol=1e-3)
        found, wanted = np.array(record["registration"][0]), np.array(record["expected"][0])
        assert record["shift_error_px"][0] == pytest.approx(np.hypot(*(found[:2] - wanted[:2])), abs=1e-2)
    assert moved["registration"]["error"]["shift_px"]["max"] >= 0.0  # reported, not asserted: see the README
    assert (tmp_path / "moved" / "precision_recall.png").is_file()


def test_a_repository_copy_serves_only_the_detector_files_given(tmp_path):
    detector_dir = tmp_path / "detector"
    detector_dir.mkdir()
    (detector_dir / "model.int8.onnx").write_bytes(b"another detector")
    with repository_with_detector(MODELS_ROOT, None) as same:
        assert same == MODELS_ROOT
    with repository_with_detector(MODELS_ROOT, detector_dir) as copy:
        version_dir = served_contract(models_root=copy).detector_version_dir
        assert [path.name for path in version_dir.glob("*.onnx")] == ["model.int8.onnx"], "none of its own is left"
        assert (version_dir / "model.int8.onnx").read_bytes() == b"another detector"
        for config in MODELS_ROOT.glob("*/config.pbtxt"):
            assert (copy / config.relative_to(MODELS_ROOT)).read_bytes() == config.read_bytes()
    assert not copy.exists() and served_contract().detector_onnx.is_file()
    with pytest.raises(SystemExit, match="holds no ONNX detector"):
        with repository_with_detector(MODELS_ROOT, tmp_path / "empty"):
            pass


@pytest.mark.live
def test_live_evaluation_of_the_held_out_groups_detector_on_its_validation_boards(deeppcb_root, tmp_path, capsys):
    args = ["--data", str(deeppcb_root), "--list", "trainval.txt", "--split", "val", "--limit", "2",
            "--with-templates", "--out", str(tmp_path)]
    with pytest.raises(SystemExit):  # the shipped detector learnt every trainval board
        main(args)
    assert "trained on every board" in capsys.readouterr().err
    report = main([*args, "--start-server", "--detector", str(HELD_OUT_GROUPS_DETECTOR)])
    assert report["setup"]["detector"] == str(HELD_OUT_GROUPS_DETECTOR)
    assert report["metrics"]["images"] == 2 and report["metrics"]["deeppcb"]["at_threshold"]["true_positives"] > 0
