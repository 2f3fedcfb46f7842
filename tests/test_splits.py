"""tools.data.splits: the validation split as one named object, by random draw or by whole groups."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tools.data.deeppcb import Sample
from tools.data.splits import ValidationSplit, sample_group, split_flags


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
