"""tools.data.synth_boards: deterministic boards, DeepPCB-format output, truthful and tight defect boxes."""
from pathlib import Path

import cv2
import numpy as np
import pytest

from tools.data.deeppcb import CLASS_NAMES, read_split
from tools.data.synth_boards.__main__ import main
from tools.data.synth_boards.board import render_board
from tools.data.synth_boards.dataset import board_rng, write_dataset
from tools.data.synth_boards.defects import BOX_PADDING, inject_defects
from tools.data.synth_boards.pair import generate_pair

BOARD_COUNT = 6
SEED = 3


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    write_dataset(root, BOARD_COUNT, seed=SEED, progress=False)
    return root


def test_same_seed_same_board_and_other_seed_other_board():
    first = generate_pair(320, 256, board_rng(7, 0))
    again = generate_pair(320, 256, board_rng(7, 0))
    other = generate_pair(320, 256, board_rng(8, 0))
    for a, b in [(first.test, again.test), (first.template, again.template), (first.boxes, again.boxes)]:
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(first.classes, again.classes)
    assert not np.array_equal(first.template, other.template)


def test_list_and_annotations_round_trip_through_read_split(dataset):
    samples = read_split(dataset, "test.txt")
    assert len(samples) == BOARD_COUNT
    for sample in samples:
        assert sample.image_path.name.endswith("_test.jpg") and sample.image_path.is_file()
        assert sample.template_path.name.endswith("_temp.jpg") and sample.template_path.is_file()
        assert sample.annotation_path.parent.name.endswith("_not")
    last = BOARD_COUNT - 1
    expected = generate_pair(640, 640, board_rng(SEED, last))
    np.testing.assert_array_equal(samples[last].boxes, expected.boxes)  # integer corners survive the text file
    np.testing.assert_array_equal(samples[last].classes, expected.classes)


def test_every_box_is_inside_the_image_and_covers_a_real_difference(dataset):
    for sample in read_split(dataset, "test.txt"):
        test = cv2.imread(str(sample.image_path), cv2.IMREAD_GRAYSCALE)
        template = cv2.imread(str(sample.template_path), cv2.IMREAD_GRAYSCALE)
        assert test.shape == template.shape == (640, 640)
        # an opening drops the one-pixel edge slivers that misregistration leaves between two scans
        difference = ((test < 128) != (template < 128)).astype(np.uint8)
        difference = cv2.morphologyEx(difference, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
        assert len(sample.boxes) >= 1
        for x1, y1, x2, y2 in sample.boxes.astype(int):
            assert 0 <= x1 < x2 <= 640 and 0 <= y1 < y2 <= 640
            assert difference[y1:y2, x1:x2].sum() >= 10, (sample.image_path, (x1, y1, x2, y2))


def test_all_six_classes_occur_over_a_handful_of_boards(dataset):
    classes = np.concatenate([s.classes for s in read_split(dataset, "test.txt")])
    assert set(classes.tolist()) == set(range(len(CLASS_NAMES)))


@pytest.mark.parametrize("index", range(4))
def test_boxes_are_the_padded_extent_of_each_change_and_do_not_overlap(index):
    rng = board_rng(11, index)
    board = render_board(640, 480, rng)
    defective, boxes, classes = inject_defects(board, 12, rng)
    assert len(boxes) == len(classes) >= 1
    changed = defective != board.copper
    covered = np.zeros_like(changed)
    for x1, y1, x2, y2 in boxes.astype(int):
        ys, xs = np.nonzero(changed[y1:y2, x1:x2])
        tight = (
            max(0, x1 + xs.min() - BOX_PADDING),
            max(0, y1 + ys.min() - BOX_PADDING),
            min(640, x1 + xs.max() + 1 + BOX_PADDING),
            min(480, y1 + ys.max() + 1 + BOX_PADDING),
        )
        assert tight == (x1, y1, x2, y2)
        covered[y1:y2, x1:x2] = True
    assert not (changed & ~covered).any(), "a change lies outside every box"
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], (a, b)


def test_whole_board_scan_size():
    pair = generate_pair(4096, 3072, board_rng(0, 0))
    assert pair.test.shape == pair.template.shape == (3072, 4096)
    assert len(pair.boxes) > 50  # defect count grows with the board area
    assert (pair.boxes[:, 2] <= 4096).all() and (pair.boxes[:, 3] <= 3072).all() and (pair.boxes >= 0).all()


def test_cli_writes_png_with_given_height_and_list_name(tmp_path):
    main(["--out", str(tmp_path), "--count", "2", "--size", "320", "--height", "240", "--seed", "1",
          "--format", "png", "--list-file", "trainval.txt"])
    samples = read_split(tmp_path, "trainval.txt")
    assert len(samples) == 2
    for sample in samples:
        image = cv2.imread(str(sample.image_path), cv2.IMREAD_UNCHANGED)
        assert sample.image_path.suffix == ".png" and image.shape == (240, 320)
        assert set(np.unique(image).tolist()) <= {0, 255}  # lossless: still binary
