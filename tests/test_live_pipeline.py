"""The served pcb_pipeline, end to end over gRPC and HTTP, against a real tritonserver (CPU configs)."""
from __future__ import annotations

import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.encoded_images import png_declaring
from tools.client.pipeline_client import PipelineClient, encoded_images_input
from tools.contract import served_contract
from tools.detections import box_iou
from tools.eval.metrics import VOC_IOU_THRESHOLD, match_image

CONTRACT = served_contract("cpu")  # what the test server serves
PIPELINE, OUTPUT_NAMES, LABELS = CONTRACT.pipeline_model, CONTRACT.output_names, CONTRACT.labels
PROTOCOLS = ("grpc", "http")


def infer_raw(server, protocol: str, encoded_images: list[bytes], parameters: dict | None = None,
              image_input=None) -> dict[str, np.ndarray]:
    """One pcb_pipeline request with its own client (safe to call from several threads); raw padded outputs."""
    module = grpcclient if protocol == "grpc" else httpclient
    client = module.InferenceServerClient(server.grpc_url if protocol == "grpc" else server.http_url)
    try:
        result = client.infer(
            PIPELINE,
            [image_input or encoded_images_input(encoded_images, module.InferInput)],
            outputs=[module.InferRequestedOutput(name) for name in OUTPUT_NAMES],
            parameters=parameters,
        )
        return {name: result.as_numpy(name) for name in OUTPUT_NAMES}
    finally:
        client.close()


def detections_of(outputs: dict[str, np.ndarray], index: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    count = int(outputs["NUM_DETECTIONS"][index, 0])
    return (outputs["BOXES"][index, :count], outputs["SCORES"][index, :count], outputs["CLASSES"][index, :count])


def check_outputs(outputs: dict[str, np.ndarray], image_sizes: list[tuple[int, int]], score_threshold: float) -> None:
    """Shapes, dtypes, zero padding past NUM_DETECTIONS, boxes inside each (width, height) image, valid classes."""
    batch, k = len(image_sizes), CONTRACT.max_detections
    expected = {"NUM_DETECTIONS": (np.int32, (batch, 1)), "BOXES": (np.float32, (batch, k, 4)),
                "SCORES": (np.float32, (batch, k)), "CLASSES": (np.int32, (batch, k))}
    for name, (dtype, shape) in expected.items():
        assert outputs[name].dtype == dtype and outputs[name].shape == shape, name
    for index, (width, height) in enumerate(image_sizes):
        count = int(outputs["NUM_DETECTIONS"][index, 0])
        assert 0 <= count <= k
        for name in ("BOXES", "SCORES", "CLASSES"):
            assert not outputs[name][index, count:].any(), f"{name} rows past NUM_DETECTIONS must be zero"
        boxes, scores, classes = detections_of(outputs, index)
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
        assert (boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all()
        assert (boxes[:, 0] <= boxes[:, 2]).all() and (boxes[:, 1] <= boxes[:, 3]).all()
        assert ((scores > score_threshold) & (scores <= 1)).all()
        assert (np.diff(scores) <= 0).all(), "detections are sorted by descending score"
        assert ((classes >= 0) & (classes < len(LABELS))).all()


def assert_same_detections(a: dict[str, np.ndarray], b: dict[str, np.ndarray], index_a: int = 0,
                           index_b: int = 0) -> None:
    boxes_a, scores_a, classes_a = detections_of(a, index_a)
    boxes_b, scores_b, classes_b = detections_of(b, index_b)
    assert len(scores_a) == len(scores_b)
    np.testing.assert_array_equal(classes_a, classes_b)
    np.testing.assert_allclose(scores_a, scores_b, atol=1e-4)
    np.testing.assert_allclose(boxes_a, boxes_b, atol=1e-2)


def encode(image: np.ndarray, suffix: str) -> bytes:
    ok, data = cv2.imencode(suffix, image)
    assert ok
    return data.tobytes()


@pytest.fixture(scope="module")
def board(board_bytes) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(board_bytes, np.uint8), cv2.IMREAD_GRAYSCALE)


@pytest.fixture(scope="module")
def lossless_copies(board) -> list[bytes]:
    """The decoded board re-encoded without loss: PNG grey, PNG colour, BMP colour, TIFF grey."""
    colour = cv2.cvtColor(board, cv2.COLOR_GRAY2BGR)
    return [encode(board, ".png"), encode(colour, ".png"), encode(colour, ".bmp"), encode(board, ".tiff")]


@pytest.fixture(scope="module")
def image_variants(board, board_bytes) -> list[tuple[bytes, tuple[int, int]]]:
    """Images of several formats, colour modes and shapes: (encoded bytes, (width, height))."""
    height, width = board.shape
    colour = cv2.cvtColor(board, cv2.COLOR_GRAY2BGR)
    return [
        (board_bytes, (width, height)),
        (encode(colour, ".jpg"), (width, height)),
        (encode(board[: height // 2], ".bmp"), (width, height // 2)),
        (encode(colour[:, : width * 3 // 4], ".tiff"), (width * 3 // 4, height)),
        (encode(board[:, : width // 2], ".png"), (width // 2, height)),
    ]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_single_image(triton_server, protocol, board_bytes, board):
    outputs = infer_raw(triton_server, protocol, [board_bytes])
    check_outputs(outputs, [board.shape[::-1]], CONTRACT.score_threshold)
    assert outputs["NUM_DETECTIONS"][0, 0] > 0, "a board with labelled defects yields detections"


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_batch_matches_single_requests(triton_server, protocol, image_variants):
    encoded = [data for data, _ in image_variants]
    batched = infer_raw(triton_server, protocol, encoded)
    check_outputs(batched, [size for _, size in image_variants], CONTRACT.score_threshold)
    for index, data in enumerate(encoded):
        assert_same_detections(batched, infer_raw(triton_server, protocol, [data]), index_a=index)


def test_same_pixels_in_any_format_give_same_detections(triton_server, board_bytes, lossless_copies):
    """The JPEG board and lossless PNG/BMP/TIFF, grey or colour, copies of its pixels detect the same."""
    reference = infer_raw(triton_server, "grpc", [board_bytes])
    for data in lossless_copies:
        assert_same_detections(reference, infer_raw(triton_server, "grpc", [data]))


def test_boxes_map_back_to_original_pixels(triton_server, board, board_bytes):
    """An upscaled board letterboxes to (nearly) the same detector input: its boxes are the originals scaled."""
    factor, confident_score = 1.5, 0.5
    upscaled = cv2.resize(board, None, fx=factor, fy=factor, interpolation=cv2.INTER_LINEAR)
    original_boxes, original_scores, original_classes = detections_of(infer_raw(triton_server, "grpc", [board_bytes]))
    # A lower threshold on the upscaled board keeps detections whose score moved a little with resampling.
    scaled_boxes, _, scaled_classes = detections_of(
        infer_raw(triton_server, "grpc", [encode(upscaled, ".png")], {"score_threshold": confident_score - 0.1}))
    confident = original_scores > confident_score
    assert confident.any(), "the board needs confident detections to compare"
    iou = box_iou(original_boxes[confident] * factor, scaled_boxes)
    same_class = original_classes[confident][:, None] == scaled_classes[None, :]
    matched = ((iou >= 0.8) & same_class).any(axis=1)
    assert matched.mean() >= 0.9, f"only {matched.sum()} of {len(matched)} confident boxes found again at x{factor}"


def test_labelled_defects_are_detected(triton_server, labelled_boards):
    """Recall and precision against the labels (PASCAL VOC pairing: same class, IoU above 0.5) on real boards,
    without their templates: the whole served path gives what the labels say."""
    with PipelineClient(triton_server.grpc_url) as client:
        results = client.infer_files([sample.image_path for sample in labelled_boards], progress=False)
    pairs = [match_image(sample, result, "voc", VOC_IOU_THRESHOLD) for sample, result in zip(labelled_boards, results)]
    true_positives = sum(int(is_true_positive.sum()) for is_true_positive, _ in pairs)
    found = sum(int(gt_found.sum()) for _, gt_found in pairs)
    labelled = sum(len(sample.boxes) for sample in labelled_boards)
    detected = sum(len(result.boxes) for result in results)
    assert labelled > 0
    recall, precision = found / labelled, true_positives / max(detected, 1)
    assert recall >= 0.8 and precision >= 0.6, f"recall {recall:.2f}, precision {precision:.2f}"


def test_concurrent_clients_get_sequential_results(triton_server, image_variants, tmp_path):
    paths = []
    for index, (data, _) in enumerate(image_variants):
        paths.append(tmp_path / f"variant{index}.img")
        paths[-1].write_bytes(data)
    with PipelineClient(triton_server.grpc_url) as client:
        sequential = [client.infer([path.read_bytes()])[0] for path in paths]

    def run_client(_):
        with PipelineClient(triton_server.grpc_url) as client:
            return client.infer_files(paths, concurrency=3, progress=False)

    with ThreadPoolExecutor(3) as pool:
        concurrent_runs = list(pool.map(run_client, range(3)))
    for run in concurrent_runs:
        for expected, got in zip(sequential, run):
            np.testing.assert_array_equal(got.classes, expected.classes)
            np.testing.assert_allclose(got.scores, expected.scores, atol=1e-4)
            np.testing.assert_allclose(got.boxes, expected.boxes, atol=1e-2)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_score_threshold_override_applies_to_its_request_only(triton_server, protocol, board_bytes):
    default = infer_raw(triton_server, protocol, [board_bytes])
    _, default_scores, _ = detections_of(default)
    assert len(np.unique(default_scores)) >= 2, "need detections of different scores to raise the threshold between"
    threshold = float(np.median(np.unique(default_scores)))
    raised = infer_raw(triton_server, protocol, [board_bytes], {"score_threshold": threshold})

    # A higher threshold keeps exactly the default detections scoring above it.
    boxes, scores, classes = detections_of(default)
    kept = scores > threshold
    assert 0 < kept.sum() < len(scores)
    assert int(raised["NUM_DETECTIONS"][0, 0]) == int(kept.sum())
    np.testing.assert_allclose(detections_of(raised)[0], boxes[kept], atol=1e-3)
    np.testing.assert_array_equal(detections_of(raised)[2], classes[kept])

    # Interleaved concurrent requests each get their own threshold, even when the server batches them.
    requests = [None, {"score_threshold": threshold}] * 4
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda parameters: infer_raw(triton_server, protocol, [board_bytes], parameters),
                                requests))
    for parameters, result in zip(requests, results):
        assert_same_detections(result, raised if parameters else default)


def test_score_threshold_zero_is_answered_with_at_most_k_detections(triton_server, board_bytes, board):
    """The worst case a client can ask for: every candidate enters NMS (bounded by pre_nms_top_k), K come back."""
    outputs = infer_raw(triton_server, "grpc", [board_bytes], {"score_threshold": 0.0})
    check_outputs(outputs, [board.shape[::-1]], 0.0)
    default = infer_raw(triton_server, "grpc", [board_bytes])
    assert outputs["NUM_DETECTIONS"][0, 0] >= default["NUM_DETECTIONS"][0, 0]


def test_iou_threshold_override(triton_server, board_bytes, board):
    iou_threshold = 0.1
    default = infer_raw(triton_server, "grpc", [board_bytes])
    strict = infer_raw(triton_server, "grpc", [board_bytes], {"iou_threshold": iou_threshold})
    check_outputs(strict, [board.shape[::-1]], CONTRACT.score_threshold)
    assert strict["NUM_DETECTIONS"][0, 0] <= default["NUM_DETECTIONS"][0, 0]
    boxes, _, classes = detections_of(strict)
    height, width = board.shape
    # Boxes clipped at the image border have changed overlaps; compare the others.
    inside = (boxes[:, 0] > 0) & (boxes[:, 1] > 0) & (boxes[:, 2] < width) & (boxes[:, 3] < height)
    iou = box_iou(boxes[inside], boxes[inside])
    same_class = classes[inside][:, None] == classes[inside][None, :]
    np.fill_diagonal(same_class, False)
    assert (iou[same_class] <= iou_threshold + 1e-4).all()


@pytest.mark.parametrize("value", ["high", 1.5])
def test_invalid_threshold_is_rejected(triton_server, board_bytes, value):
    with pytest.raises(InferenceServerException, match="score_threshold"):
        infer_raw(triton_server, "grpc", [board_bytes], {"score_threshold": value})


def bad_inputs(board_bytes: bytes) -> dict[str, tuple[dict, str]]:
    """Named bad requests: (infer_raw keyword arguments, text the error must contain)."""
    wrong_dtype = {"grpc": grpcclient.InferInput("IMAGE", [1, 1], "FP32"),
                   "http": httpclient.InferInput("IMAGE", [1, 1], "FP32")}
    for image_input in wrong_dtype.values():
        image_input.set_data_from_numpy(np.zeros((1, 1), np.float32))
    return {
        "empty": ({"encoded_images": [b""]}, "empty image data"),
        "not_an_image": ({"encoded_images": [b"%PDF-1.7 this is not an image"]}, "not a jpeg, png, bmp or tiff"),
        "truncated_jpeg": ({"encoded_images": [board_bytes[: len(board_bytes) // 2]]}, "truncated"),
        "decompression_bomb": ({"encoded_images": [png_declaring(50_000, 50_000)]}, "over the limit"),
        "wrong_dtype": ({"encoded_images": [], "wrong_dtype": wrong_dtype}, "data-type is 'fp32'"),
    }


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("problem", ["empty", "not_an_image", "truncated_jpeg", "decompression_bomb", "wrong_dtype"])
def test_bad_input_fails_alone(triton_server, protocol, problem, board_bytes):
    arguments, expected_message = bad_inputs(board_bytes)[problem]
    wrong_dtype = arguments.pop("wrong_dtype", None)
    if wrong_dtype:
        arguments["image_input"] = wrong_dtype[protocol]
    reference = infer_raw(triton_server, protocol, [board_bytes])

    # Good requests around the bad one, in flight together so the server may batch them with it.
    with ThreadPoolExecutor(3) as pool:
        good = [pool.submit(infer_raw, triton_server, protocol, [board_bytes]) for _ in range(2)]
        bad = pool.submit(infer_raw, triton_server, protocol, **arguments)
        with pytest.raises(InferenceServerException) as error:
            bad.result()
        for future in good:
            assert_same_detections(future.result(), reference)
    assert expected_message in error.value.message().lower()
    assert triton_server.is_ready()
    assert_same_detections(infer_raw(triton_server, protocol, [board_bytes]), reference)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_bad_element_in_a_batch_is_named(triton_server, protocol, board_bytes):
    """One request gets one response: a bad element fails its whole batch, and the error says which one."""
    with pytest.raises(InferenceServerException) as error:
        infer_raw(triton_server, protocol, [board_bytes, b"", board_bytes])
    assert "IMAGE[1]: empty image data" in error.value.message()


def test_health_endpoints(triton_server):
    for path in ("/v2/health/live", "/v2/health/ready", f"/v2/models/{PIPELINE}/ready"):
        with urllib.request.urlopen(f"http://{triton_server.http_url}{path}") as response:
            assert response.status == 200, path
    client = grpcclient.InferenceServerClient(triton_server.grpc_url)
    try:
        assert client.is_server_live() and client.is_server_ready()
        for model in (CONTRACT.preprocess_model, CONTRACT.detector_model, CONTRACT.postprocess_model, PIPELINE):
            assert client.is_model_ready(model), model
    finally:
        client.close()


def pipeline_counter(server, metric: str) -> float:
    """A pcb_pipeline counter from the Prometheus text on the metrics endpoint, summed over its other labels."""
    with urllib.request.urlopen(server.metrics_url) as response:
        text = response.read().decode()
    assert f"# TYPE {metric} counter" in text
    values = []
    for line in text.splitlines():
        series, _, value = line.rpartition(" ")
        if series.startswith(metric + "{") and f'model="{PIPELINE}"' in series:
            values.append(float(value))
    assert values, f"no {metric} series for {PIPELINE}"
    return sum(values)


def wait_for_counter(server, metric: str, at_least: float) -> float:
    """The counter once it reaches ``at_least`` (counters may lag the response a little), or after 10 s."""
    deadline = time.monotonic() + 10
    while (value := pipeline_counter(server, metric)) < at_least and time.monotonic() < deadline:
        time.sleep(0.2)
    return value


def test_metrics_count_requests(triton_server, board_bytes):
    successes = pipeline_counter(triton_server, "nv_inference_request_success")
    failures = pipeline_counter(triton_server, "nv_inference_request_failure")
    infer_raw(triton_server, "grpc", [board_bytes])
    with pytest.raises(InferenceServerException):
        infer_raw(triton_server, "grpc", [b""])
    assert wait_for_counter(triton_server, "nv_inference_request_success", successes + 1) == successes + 1
    assert wait_for_counter(triton_server, "nv_inference_request_failure", failures + 1) > failures
