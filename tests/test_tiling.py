"""Tiled inference of large scans: tile layout, merging across tiles, mosaics, and the live pipeline."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from tools.client.pipeline_client import InferenceFailed, PipelineClient
from tools.data.deeppcb import read_split
from tools.data.mosaic import stitch, write_mosaics
from tools.detections import Detections, box_iou
from tools.eval.metrics import match_in_file_order
from tools.client.tiling import (
    DEFAULT_OVERLAP,
    EDGE_MARGIN,
    TileSpec,
    Window,
    cut_by_inner_edge,
    merge_tiles,
    read_tiles,
    tile_origins,
    tile_windows,
)

LARGEST_DEEPPCB_DEFECT = 170  # px, over the whole trainval split


# ---- layout -----------------------------------------------------------------------------------------------


def test_tiles_step_by_size_minus_overlap_and_end_flush():
    assert tile_origins(640, 640, 192) == [0]
    assert tile_origins(500, 640, 192) == [0]
    assert tile_origins(2560, 640, 192) == [0, 448, 896, 1344, 1792, 1920]
    assert tile_origins(641, 640, 192) == [0, 1]


def test_windows_cover_the_scan_row_major_and_clip_short_sides():
    windows = tile_windows(height=500, width=1000, spec=TileSpec())
    assert windows == [Window(0, 0, 640, 500), Window(360, 0, 1000, 500)]


def test_every_defect_no_wider_than_the_overlap_is_kept_whole_by_some_tile():
    assert DEFAULT_OVERLAP >= LARGEST_DEEPPCB_DEFECT + EDGE_MARGIN
    height, width = 1700, 3100
    windows = tile_windows(height, width, TileSpec())
    rng = np.random.default_rng(0)
    for _ in range(2000):
        w, h = rng.integers(4, LARGEST_DEEPPCB_DEFECT + 1, size=2)
        x1, y1 = rng.integers(0, width - w), rng.integers(0, height - h)
        keepers = [
            window for window in windows
            if window.x0 <= x1 and x1 + w <= window.x1 and window.y0 <= y1 and y1 + h <= window.y1
            and not cut_by_inner_edge(np.array([[x1 - window.x0, y1 - window.y0, x1 + w - window.x0,
                                                 y1 + h - window.y0]], np.float32), window, height, width)[0]
        ]
        assert keepers, (x1, y1, w, h)


def test_tile_spec_rejects_impossible_settings():
    for size, overlap in ((640, 640), (640, -1), (0, 0)):
        with pytest.raises(ValueError, match="overlap"):
            TileSpec(size, overlap)
    with pytest.raises(ValueError, match="merge IoU"):
        TileSpec(merge_iou=0)


# ---- merging ----------------------------------------------------------------------------------------------


def tile_result(boxes, scores, classes) -> Detections:
    return Detections(np.array(boxes, np.float32).reshape(-1, 4), np.array(scores, np.float32),
                      np.array(classes, np.int32))


def test_boxes_on_inner_tile_edges_are_cut_and_on_the_scan_border_are_not():
    window = Window(448, 0, 1088, 640)  # a middle tile of a 1536-wide, 640-high scan
    boxes = np.array([[0, 100, 30, 130],  # on the left edge, inside the scan: cut
                      [610, 100, 640, 130],  # on the right edge, inside the scan: cut
                      [100, 0, 130, 30],  # on the top edge, which is the scan border: whole
                      [100, 300, 130, 330]], np.float32)
    assert cut_by_inner_edge(boxes, window, height=640, width=1536).tolist() == [True, True, False, False]


def test_a_defect_seen_by_two_tiles_is_reported_once_in_scan_coordinates():
    windows = [Window(0, 0, 640, 640), Window(448, 0, 1088, 640)]
    left = tile_result([[500, 100, 540, 140], [620, 300, 640, 330]], [0.9, 0.8], [2, 4])  # 2nd cut by the edge
    right = tile_result([[52, 101, 92, 141], [150, 300, 190, 330]], [0.85, 0.7], [2, 4])  # same defect; its whole
    boxes, scores, classes = merge_tiles([left, right], windows, height=640, width=1088, merge_iou=0.45)
    assert classes.tolist() == [2, 4]
    np.testing.assert_allclose(boxes, [[500, 100, 540, 140], [598, 300, 638, 330]])
    np.testing.assert_allclose(scores, [0.9, 0.7])


def test_overlapping_defects_of_different_classes_both_stay():
    windows = [Window(0, 0, 640, 640), Window(448, 0, 1088, 640)]
    left = tile_result([[500, 100, 540, 140]], [0.9], [2])
    right = tile_result([[52, 100, 92, 140]], [0.6], [3])
    _, _, classes = merge_tiles([left, right], windows, height=640, width=1088, merge_iou=0.45)
    assert classes.tolist() == [2, 3]


def test_small_images_go_as_they_are_and_large_ones_as_png_tiles(tmp_path):
    small = tmp_path / "small.jpg"
    cv2.imwrite(str(small), np.full((640, 600), 255, np.uint8))
    encoded, layout = read_tiles(small, TileSpec())
    assert encoded == [small.read_bytes()] and layout is None

    scan = np.random.default_rng(0).integers(0, 2, size=(700, 1300), dtype=np.uint8) * 255
    large = tmp_path / "large.png"
    cv2.imwrite(str(large), scan)
    encoded, (windows, height, width) = read_tiles(large, TileSpec())
    assert (height, width, len(encoded)) == (700, 1300, len(windows)) and len(windows) == 3 * 2
    for tile, window in zip(encoded, windows):
        decoded = cv2.imdecode(np.frombuffer(tile, np.uint8), cv2.IMREAD_GRAYSCALE)
        np.testing.assert_array_equal(decoded, scan[window.y0 : window.y1, window.x0 : window.x1])

    not_an_image = tmp_path / "notes.png"
    not_an_image.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot decode"):
        read_tiles(not_an_image, TileSpec())


# ---- mosaics ----------------------------------------------------------------------------------------------


def test_stitch_places_boards_row_major():
    boards = [np.full((2, 3), value, np.uint8) for value in (1, 2, 3)]
    mosaic, origins = stitch(boards, columns=2)
    assert origins == [(0, 0), (3, 0), (0, 2)]
    assert mosaic.shape == (4, 6)
    assert mosaic[0, 0] == 1 and mosaic[0, 3] == 2 and mosaic[2, 0] == 3 and mosaic[2, 3] == 0


def test_mosaic_labels_follow_their_boards(labelled_boards, tmp_path):
    list_path, left_out = write_mosaics(labelled_boards[:5], columns=2, rows=2, out_dir=tmp_path, progress=False)
    assert left_out == 1
    (mosaic,) = read_split(tmp_path, list_path.name)
    image = cv2.imread(str(mosaic.image_path), cv2.IMREAD_GRAYSCALE)
    board = cv2.imread(str(labelled_boards[3].image_path), cv2.IMREAD_GRAYSCALE)
    height, width = board.shape
    np.testing.assert_array_equal(image[height:, width:], board)
    fourth = labelled_boards[3].boxes + np.array([width, height, width, height], np.float32)
    np.testing.assert_array_equal(mosaic.boxes[-len(fourth):], np.round(fourth))
    assert sum(len(b.classes) for b in labelled_boards[:4]) == len(mosaic.classes)


# ---- live pipeline ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mosaic_scan(labelled_boards, tmp_path_factory):
    """The labelled boards stitched 4 x 2 into one 2560 x 1280 scan, with its labels."""
    out = tmp_path_factory.mktemp("mosaic")
    list_path, _ = write_mosaics(labelled_boards[:8], columns=4, rows=2, out_dir=out, progress=False)
    (scan,) = read_split(out, list_path.name)
    return scan


def found_fraction(sample, detections: Detections) -> float:
    _, found = match_in_file_order(sample.boxes, sample.classes, detections.boxes, detections.classes)
    return float(found.mean())


def test_tiled_scan_finds_what_the_boards_alone_give(triton_server, labelled_boards, mosaic_scan):
    boards = labelled_boards[:8]
    with PipelineClient(triton_server.grpc_url) as client:
        per_board = client.infer_files([b.image_path for b in boards], progress=False)
        (tiled,) = client.infer_files([mosaic_scan.image_path], progress=False, tiles=TileSpec())
        (one_at_a_time,) = client.infer_files([mosaic_scan.image_path], concurrency=1, progress=False,
                                              tiles=TileSpec())
        (shrunk,) = client.infer_files([mosaic_scan.image_path], progress=False)
    # 18 tiles go as 3 requests; with one in flight each returns before the next is sent.
    np.testing.assert_allclose(one_at_a_time.boxes, tiled.boxes, atol=1e-3)

    width, height = 640, 640
    shifted = Detections(
        np.concatenate([d.boxes + [(i % 4) * width, (i // 4) * height] * 2 for i, d in enumerate(per_board)]),
        np.concatenate([d.scores for d in per_board]),
        np.concatenate([d.classes for d in per_board]),
    )
    # The same defects as board by board: nearly every detection has its twin (same class, IoU > 0.5).
    same_class = shifted.classes[:, None] == tiled.classes[None, :]
    twins = (box_iou(shifted.boxes, tiled.boxes) > 0.5) & same_class
    assert len(tiled.classes) > 0.9 * len(shifted.classes) > 0
    assert twins.any(axis=1).mean() > 0.9 and twins.any(axis=0).mean() > 0.9
    board_recall = found_fraction(mosaic_scan, shifted)
    assert found_fraction(mosaic_scan, tiled) >= board_recall - 0.05
    # Without tiling the pipeline shrinks the scan 4x and most defects vanish.
    assert found_fraction(mosaic_scan, shrunk) < board_recall / 2


def test_a_file_that_cannot_be_tiled_is_named_and_the_others_are_answered(triton_server, mosaic_scan, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with PipelineClient(triton_server.grpc_url) as client:
        with pytest.raises(InferenceFailed) as failed:
            client.infer_files([broken, mosaic_scan.image_path], progress=False, tiles=TileSpec())
    assert failed.value.failures == {str(broken): "cannot tile file: OpenCV cannot decode this file as an image"}
    assert failed.value.results[0] is None
    assert found_fraction(mosaic_scan, failed.value.results[1]) > 0.5
