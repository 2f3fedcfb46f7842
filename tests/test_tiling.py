"""Whole-board scans: the scan model's tile layout and merging, its config, mosaics, and the live pcb_scan."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from tests.encoded_images import png_declaring
from tools.client.pipeline_client import InferenceFailed, PipelineClient, encoded_images_input
from tools.contract import load_repository, parameter, served_contract, tensor
from tools.data.deeppcb import read_split
from tools.data.mosaic import stitch, write_mosaics
from tools.detections import Detections, box_iou
from tools.eval.metrics import match_in_file_order
from tools.pipeline_math import tiling
from tools.serve.triton_server import TritonServer, trace_settings

LARGEST_DEEPPCB_DEFECT = 170  # px, over the whole trainval split
CONTRACT = served_contract()
SCAN_CONFIG = load_repository()[CONTRACT.scan_model]
TILE_SIZE, OVERLAP = int(parameter(SCAN_CONFIG, "tile_size")), int(parameter(SCAN_CONFIG, "tile_overlap"))
Window, tile_origins, cut_by_inner_edge = tiling.Window, tiling.tile_origins, tiling.cut_by_inner_edge


def tile_windows(height, width):
    return tiling.tile_windows(height, width, TILE_SIZE, OVERLAP)


def merge_tiles(results, windows, height, width, merge_iou=0.45):
    return tiling.merge_tiles([r.boxes for r in results], [r.scores for r in results], [r.classes for r in results],
                              windows, height, width, merge_iou)


# ---- the scan model's config ------------------------------------------------------------------------------


def test_scan_settings_agree_with_the_pipeline():
    assert TILE_SIZE == CONTRACT.input_size, "tiles keep the scan's scale only at the detector input size"
    assert int(parameter(SCAN_CONFIG, "tiles_per_request")) == CONTRACT.typical_batch_size
    assert float(parameter(SCAN_CONFIG, "merge_iou_threshold")) == CONTRACT.iou_threshold
    assert parameter(SCAN_CONFIG, "pipeline_model") == CONTRACT.pipeline_model
    assert int(parameter(SCAN_CONFIG, "max_scan_pixels")) >= 16384 * 16384, "a whole 16k line-scan panel fits"
    pipeline = load_repository()[CONTRACT.pipeline_model]
    assert [(i.name, i.data_type, list(i.dims)) for i in SCAN_CONFIG.input] == \
        [(i.name, i.data_type, list(i.dims)) for i in pipeline.input]
    assert [i.optional for i in SCAN_CONFIG.input] == [i.optional for i in pipeline.input], "TEMPLATE is optional"
    assert int(parameter(SCAN_CONFIG, "template_size_tolerance")) == \
        CONTRACT.registration_parameters["template_size_tolerance"], "the scan checks the size its tiles need"
    for key in ("registration_max_shift", "registration_max_angle", "registration_min_score"):
        assert float(parameter(SCAN_CONFIG, key)) == CONTRACT.registration_parameters[key], key
    assert float(parameter(SCAN_CONFIG, "pad_value")) == CONTRACT.pad_value, "the no-template fill"
    for config_name in (None, "cpu"):
        preprocess = load_repository(config_name)[CONTRACT.preprocess_model]
        assert parameter(SCAN_CONFIG, "registered_template_parameter") == parameter(
            preprocess, "registered_template_parameter"), "preprocess must know the tiles' templates are registered"
    outputs = {o.name: (o.data_type, list(o.dims)) for o in SCAN_CONFIG.output}
    assert outputs.pop("NUM_TILES") == (outputs["NUM_DETECTIONS"][0], [1])
    assert list(outputs) == [o.name for o in pipeline.output], "the pipeline's outputs, in its order"
    registration = tensor(pipeline.output, CONTRACT.registration_output)
    assert outputs.pop(registration.name) == (registration.data_type, [-1, *registration.dims]), "one row per tile"
    for o in pipeline.output:
        if o.name != registration.name:
            assert outputs[o.name][0] == o.data_type and outputs[o.name][1][1:] == list(o.dims)[1:], o.name
    assert load_repository("cpu")[CONTRACT.scan_model] == SCAN_CONFIG, "one config serves GPU and CPU"


# ---- layout -----------------------------------------------------------------------------------------------


def test_tiles_step_by_size_minus_overlap_and_end_flush():
    assert tile_origins(640, 640, 192) == [0]
    assert tile_origins(500, 640, 192) == [0]
    assert tile_origins(2560, 640, 192) == [0, 448, 896, 1344, 1792, 1920]
    assert tile_origins(641, 640, 192) == [0, 1]


def test_windows_cover_the_scan_row_major_and_clip_short_sides():
    windows = tile_windows(height=500, width=1000)
    assert windows == [Window(0, 0, 640, 500), Window(360, 0, 1000, 500)]


def test_every_defect_no_wider_than_the_overlap_is_kept_whole_by_some_tile():
    assert OVERLAP >= LARGEST_DEEPPCB_DEFECT + tiling.EDGE_MARGIN
    height, width = 1700, 3100
    windows = tile_windows(height, width)
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


def test_impossible_layouts_are_refused():
    for size, overlap in ((640, 640), (640, -1), (0, 0)):
        with pytest.raises(ValueError, match="overlap"):
            tiling.check_layout(size, overlap)


# ---- merging ----------------------------------------------------------------------------------------------


tile_result = Detections.of


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


def test_a_mosaic_through_pcb_scan_finds_what_the_boards_alone_give(triton_server, labelled_boards, mosaic_scan):
    boards = labelled_boards[:8]
    with PipelineClient(triton_server.grpc_url) as client:
        per_board = client.infer_files([b.image_path for b in boards], progress=False)
        (tiled,) = client.infer_files([mosaic_scan.image_path], progress=False, scans=True)
        (shrunk,) = client.infer_files([mosaic_scan.image_path], progress=False)

    board_height, board_width = cv2.imread(str(boards[0].image_path), cv2.IMREAD_GRAYSCALE).shape
    shifted = Detections(
        np.concatenate([d.boxes + [(i % 4) * board_width, (i // 4) * board_height] * 2 for i, d in enumerate(per_board)]),
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


def scan_request(server, scans: list[bytes], parameters=None):
    """One raw pcb_scan request; its outputs, or the InferenceServerException."""
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        names = [*CONTRACT.output_names, "NUM_TILES"]
        result = client.infer(CONTRACT.scan_model, [encoded_images_input(scans)], parameters=parameters,
                              outputs=[grpcclient.InferRequestedOutput(n) for n in names])
        return {name: result.as_numpy(name) for name in names}
    finally:
        client.close()


def test_pcb_scan_counts_its_tiles_and_pads_to_k(triton_server, mosaic_scan):
    outputs = scan_request(triton_server, [mosaic_scan.image_path.read_bytes()])
    height, width = cv2.imread(str(mosaic_scan.image_path), cv2.IMREAD_GRAYSCALE).shape
    assert outputs["NUM_TILES"][0, 0] == len(tile_windows(height, width))
    count, k = int(outputs["NUM_DETECTIONS"][0, 0]), outputs["BOXES"].shape[1]
    assert 0 < count <= k and not outputs["BOXES"][0, count:].any() and not outputs["SCORES"][0, count:].any()
    boxes = outputs["BOXES"][0, :count]
    assert (boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all(), "boxes in scan pixels"
    assert (np.diff(outputs["SCORES"][0, :count]) <= 0).all()


def test_pcb_scan_applies_the_request_threshold_and_refuses_a_bad_one(triton_server, mosaic_scan):
    scan = mosaic_scan.image_path.read_bytes()
    strict = scan_request(triton_server, [scan], {"score_threshold": 0.9})
    assert (strict["SCORES"][0, : int(strict["NUM_DETECTIONS"][0, 0])] > 0.9).all()
    with pytest.raises(Exception, match="score_threshold"):
        scan_request(triton_server, [scan], {"score_threshold": 5.0})


@pytest.mark.parametrize("bad, reason", [(b"", "empty"), (b"\x89PNG\r\n\x1a\n truncated", "not a JPEG, PNG, BMP or TIFF"),
                                         ("too_large", "more than the limit")])
def test_a_bad_scan_fails_alone(triton_server, mosaic_scan, bad, reason):
    if bad == "too_large":  # a PNG whose header declares just over the limit: refused before decoding
        side = int(int(parameter(SCAN_CONFIG, "max_scan_pixels")) ** 0.5) + 1
        bad = png_declaring(side, side)
    good = mosaic_scan.image_path.read_bytes()
    with PipelineClient(triton_server.grpc_url) as client:
        with pytest.raises(InferenceFailed) as failed:
            client.infer_files([mosaic_scan.image_path, _write(mosaic_scan, bad)], progress=False, scans=True)
        (alone,) = client.infer([good], scans=True)
    (message,) = failed.value.failures.values()
    assert reason in message and "IMAGE[0]" in message
    np.testing.assert_allclose(failed.value.results[0].boxes, alone.boxes, atol=1e-3)


def _write(sample, data: bytes):
    path = sample.image_path.with_name("bad_scan.png")
    path.write_bytes(data)
    return path


def test_scans_go_through_system_shared_memory_too(triton_server, mosaic_scan):
    scan = mosaic_scan.image_path.read_bytes()
    with PipelineClient(triton_server.grpc_url) as client:
        (by_message,) = client.infer([scan], scans=True)
        (by_shared_memory,) = client.infer([scan], scans=True, shared_memory=True)
        status = client._client.get_system_shared_memory_status(as_json=True)
    np.testing.assert_array_equal(by_shared_memory.classes, by_message.classes)
    np.testing.assert_allclose(by_shared_memory.boxes, by_message.boxes, atol=1e-3)
    assert not status.get("regions"), "the region is unregistered after the request"


@pytest.mark.live  # starts its own tritonserver, with tracing
def test_tile_requests_carry_the_scan_requests_trace(tmp_path, mosaic_scan):
    """A trace of a pcb_scan request includes its pcb_pipeline requests (BLS children) as its children."""
    trace_file = tmp_path / "trace.json"
    image = cv2.imread(str(mosaic_scan.image_path), cv2.IMREAD_GRAYSCALE)[:TILE_SIZE, : TILE_SIZE + 100]  # 2 tiles
    ok, scan = cv2.imencode(".png", image)
    with TritonServer.on_free_ports(trace_config=trace_settings(trace_file, [])) as server:
        outputs = scan_request(server, [scan.tobytes()])
    assert outputs["NUM_TILES"][0, 0] == 2
    # Written TRACE_LOG_FREQUENCY traces to a file, trace.json.0, trace.json.1, ..., the rest when the server stops.
    records = [r for part in sorted(tmp_path.glob("trace.json.*")) for r in json.loads(part.read_text())]
    (scan_trace,) = [r["id"] for r in records if r.get("model_name") == CONTRACT.scan_model]
    children = [r for r in records if r.get("model_name") == CONTRACT.pipeline_model]
    assert children and all(r.get("parent_id") == scan_trace for r in children)


def test_a_scan_over_grpcs_default_4_mb_message_limit_goes_through(triton_server):
    """Both tritonclient and Triton raise gRPC's 4 MB default to 2 GiB; an incompressible 5 MB scan shows it."""
    noise = np.random.default_rng(0).integers(0, 256, size=(2240, 2240), dtype=np.uint8)
    ok, scan = cv2.imencode(".png", noise)
    assert scan.size > 4 * 2**20
    outputs = scan_request(triton_server, [scan.tobytes()], {"score_threshold": 0.9})
    assert outputs["NUM_TILES"][0, 0] == len(tile_windows(2240, 2240))
