"""tools.data.splits: the validation split as one named object, by random draw or by whole groups."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from tools.contract import served_contract
from tools.data.deeppcb import Sample
from tools.data.splits import (
    ALL_BOARDS,
    DEFAULT_SPLIT,
    HELD_OUT_GROUPS_DETECTOR,
    METADATA_KEY,
    ValidationSplit,
    agreement_boards,
    check_model_split,
    held_out_boards,
    list_digest,
    recorded_split,
    sample_group,
    select_samples,
    split_flags,
    split_record,
)


def samples_in(groups: dict[str, int]) -> list[Sample]:
    boards = []
    for group, count in groups.items():
        for index in range(count):
            image = Path("/data") / group / group.removeprefix("group") / f"{index:03d}_test.jpg"
            boards.append(Sample(image, image, image.with_suffix(".txt"), np.zeros((0, 4), np.float32),
                                 np.zeros(0, np.int64)))
    return boards


def test_random_draw_holds_out_the_fraction_and_keeps_file_order():
    boards = samples_in({"group1": 40, "group2": 60})
    train, val = ValidationSplit(0.15, 0).divide(boards)
    assert len(val) == 15 and len(train) == 85
    assert set(map(id, train)).isdisjoint(map(id, val))
    assert [boards.index(s) for s in val] == sorted(boards.index(s) for s in val)
    assert ValidationSplit(0.15, 1).divide(boards)[1] != val, "the seed draws other boards"


def test_group_split_holds_out_whole_board_designs():
    boards = samples_in({"group1": 5, "group2": 7, "group3": 3})
    train, val = ValidationSplit(groups=("group3", "group1")).divide(boards)
    assert {sample_group(s) for s in val} == {"group1", "group3"} and len(val) == 8
    assert {sample_group(s) for s in train} == {"group2"}
    assert ValidationSplit(groups=("group3", "group1")) == ValidationSplit(groups=("group1", "group3"))
    with pytest.raises(ValueError, match="group9"):
        ValidationSplit(groups=("group9",)).divide(boards)


def test_parts_and_the_flags_that_choose_a_split():
    boards = samples_in({"group1": 10})
    split = ValidationSplit(0.3, 2)
    assert split.part(boards, "all") == boards
    assert len(split.part(boards, "val")) + len(split.part(boards, "train")) == 10
    with pytest.raises(ValueError, match="part must be one of"):
        split.part(boards, "test")
    assert split_flags(split) == "--val-groups --val-fraction 0.3 --split-seed 2"
    assert split_flags(ValidationSplit(groups=("group1",))) == "--val-groups group1"


def test_a_split_round_trips_through_its_record():
    split = ValidationSplit(groups=("group20085",))
    record = {"fraction": split.fraction, "seed": split.seed, "groups": list(split.groups), "list_sha256": "x"}
    assert ValidationSplit.from_record(record) == split
    assert ValidationSplit.from_record({"fraction": 0.15, "seed": 0}) == ValidationSplit()


def detector_recording(path: Path, split: ValidationSplit, list_path: Path) -> Path:
    """A minimal ONNX file that records ``split`` of ``list_path`` in its metadata, as export writes it."""
    value = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "detector", [value],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    model = onnx.helper.make_model(graph)
    model.metadata_props.add(key=METADATA_KEY, value=split_record(split, list_path))
    onnx.save(model, str(path))
    return path


def test_a_detector_trained_on_every_board_is_refused_validation_on_them(tmp_path):
    list_path = tmp_path / "trainval.txt"
    list_path.write_text("group1/1/a.jpg group1/1/a.txt\n")
    onnx_path = detector_recording(tmp_path / "model.onnx", ALL_BOARDS, list_path)
    assert not ALL_BOARDS.holds_out and DEFAULT_SPLIT.holds_out and ValidationSplit(0.15).holds_out
    with pytest.raises(ValueError, match="trained on every board.*--detector validation/heldout_groups"):
        check_model_split(onnx_path, DEFAULT_SPLIT, list_path)
    other_list = tmp_path / "test.txt"
    other_list.write_text("group9/9/b.jpg group9/9/b.txt\n")
    check_model_split(onnx_path, DEFAULT_SPLIT, other_list)  # boards of another list were never trained on


def test_conversions_check_on_unseen_boards_where_the_detector_has_any(deeppcb_root, tmp_path, capsys):
    trainval = deeppcb_root / "trainval.txt"
    random_draw = ValidationSplit(0.15, 0)
    own = agreement_boards(detector_recording(tmp_path / "random.onnx", random_draw, trainval), deeppcb_root)
    assert own == [s.image_path for s in select_samples(deeppcb_root, "trainval.txt", "val", random_draw)]
    groups = agreement_boards(detector_recording(tmp_path / "groups.onnx", DEFAULT_SPLIT, trainval), deeppcb_root)
    assert groups == held_out_boards(deeppcb_root) != own
    assert "boards it learnt" not in capsys.readouterr().out
    every = agreement_boards(detector_recording(tmp_path / "all.onnx", ALL_BOARDS, trainval), deeppcb_root)
    assert every == groups, "nothing is unseen: the default validation boards, said so"
    assert "trained on every board" in capsys.readouterr().out


def test_the_shipped_detector_learnt_every_board_and_the_validation_one_held_out_the_groups(deeppcb_root):
    names = ("model.onnx", "model.int8.onnx")  # the FP32 source and what the CPU fallback serves
    shipped = {name: recorded_split(served_contract().detector_version_dir / name) for name in names}
    validation = {name: recorded_split(HELD_OUT_GROUPS_DETECTOR / name) for name in names}
    digest = list_digest(deeppcb_root / "trainval.txt")
    for name, record in shipped.items():
        assert record["list_sha256"] == digest and not ValidationSplit.from_record(record).holds_out, name
    for name, record in validation.items():
        assert record["list_sha256"] == digest and ValidationSplit.from_record(record) == DEFAULT_SPLIT, name
