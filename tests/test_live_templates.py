"""Golden-template requests to the served pcb_pipeline (CPU configs, real tritonserver): the optional TEMPLATE
input, the REGISTRATION output, per-request refusals of bad templates and mixed dynamic batches."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.encoded_images import png_declaring
from tools.client.pipeline_client import encoded_images_array
from tools.contract import load_repository, parameter, served_contract
from tools.data.misregistration import Misregistration
from tools.pipeline_math import preprocess_as_served, registration_settings

CONTRACT = served_contract("cpu")
PREPROCESS = load_repository("cpu")[CONTRACT.preprocess_model]
OUTPUTS = (*CONTRACT.output_names, CONTRACT.registration_output)


def infer(server, images: list[bytes], templates: list[bytes] | None = None,
          protocol: str = "grpc", parameters: dict | None = None) -> dict[str, np.ndarray]:
    """One pcb_pipeline request with its own client; all outputs, REGISTRATION included."""
    module = grpcclient if protocol == "grpc" else httpclient
    client = module.InferenceServerClient(server.grpc_url if protocol == "grpc" else server.http_url)
    inputs = []
    for name, data in ((CONTRACT.image_input, images), (CONTRACT.template_input, templates)):
        if data is not None:
            tensor = module.InferInput(name, [len(data), 1], "BYTES")
            tensor.set_data_from_numpy(encoded_images_array(data))
            inputs.append(tensor)
    try:
        result = client.infer(CONTRACT.pipeline_model, inputs, parameters=parameters,
                              outputs=[module.InferRequestedOutput(name) for name in OUTPUTS])
        return {name: result.as_numpy(name) for name in OUTPUTS}
    finally:
        client.close()


def png(image: np.ndarray) -> bytes:
    return cv2.imencode(".png", image)[1].tobytes()


@pytest.fixture(scope="module")
def pair(synthetic_boards) -> tuple[bytes, bytes]:
    """(inspected board, its defect-free template), encoded as written by the synthetic-board tool."""
    sample = synthetic_boards[0]
    return Path(sample.image_path).read_bytes(), Path(sample.template_path).read_bytes()


def assert_same_answer(a: dict, b: dict, index_a: int = 0, index_b: int = 0) -> None:
    count = int(a["NUM_DETECTIONS"][index_a, 0])
    assert count == int(b["NUM_DETECTIONS"][index_b, 0])
    np.testing.assert_array_equal(a["CLASSES"][index_a, :count], b["CLASSES"][index_b, :count])
    np.testing.assert_allclose(a["SCORES"][index_a, :count], b["SCORES"][index_b, :count], atol=1e-4)
    np.testing.assert_allclose(a["BOXES"][index_a, :count], b["BOXES"][index_b, :count], atol=1e-2)
    np.testing.assert_allclose(a["REGISTRATION"][index_a], b["REGISTRATION"][index_b], atol=1e-4)


def test_registration_is_zero_without_a_template(triton_server, pair):
    outputs = infer(triton_server, [pair[0]])
    assert outputs["REGISTRATION"].shape == (1, 4) and outputs["REGISTRATION"].dtype == np.float32
    assert not outputs["REGISTRATION"].any()


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_served_registration_equals_the_offline_one(triton_server, pair, protocol):
    """The server registers exactly as tools.pipeline_math does (the same registration.py)."""
    outputs = infer(triton_server, [pair[0]], [pair[1]], protocol)
    *_, offline = preprocess_as_served(pair[0], pair[1], contract=CONTRACT)
    np.testing.assert_allclose(outputs["REGISTRATION"][0], offline, atol=1e-5)
    assert outputs["REGISTRATION"][0, 3] >= registration_settings(CONTRACT).min_score


@pytest.mark.parametrize("dx,dy", [(25, -12), (-30, 30), (7.5, 0)])
def test_a_known_shift_is_recovered_within_one_pixel(triton_server, pair, dx, dy):
    board = cv2.imdecode(np.frombuffer(pair[1], np.uint8), cv2.IMREAD_GRAYSCALE)  # the defect-free board itself
    drift = Misregistration(dx, dy, 0.0)
    outputs = infer(triton_server, [png(board)], [png(drift.apply(board, CONTRACT.pad_value))])
    expected = drift.expected_registration(board.shape[1], board.shape[0])
    np.testing.assert_allclose(outputs["REGISTRATION"][0, :2], expected[:2], atol=1.0)


def test_a_request_saying_its_templates_are_registered_gets_them_scored_in_place(triton_server, pair):
    """What pcb_scan's tile requests say: the template is not searched (REGISTRATION has no move), only scored."""
    flag = {parameter(PREPROCESS, "registered_template_parameter"): True}
    moved = png(Misregistration(5, 0, 0).apply(cv2.imdecode(np.frombuffer(pair[1], np.uint8), cv2.IMREAD_GRAYSCALE),
                                               CONTRACT.pad_value))
    in_place = infer(triton_server, [pair[0]], [pair[1]], parameters=flag)["REGISTRATION"][0]
    assert in_place[:3].tolist() == [0, 0, 0] and in_place[3] > 0.9
    not_searched = infer(triton_server, [pair[0]], [moved], parameters=flag)["REGISTRATION"][0]
    assert not_searched[:3].tolist() == [0, 0, 0] and not_searched[3] < in_place[3]
    searched = infer(triton_server, [pair[0]], [moved])["REGISTRATION"][0]
    assert abs(searched[0] + 5) < 1, "without the parameter the template is registered as usual"


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_mixed_dynamic_batches_answer_each_request_as_alone(triton_server, pair, protocol):
    image, template = pair
    drifted = png(Misregistration(-14, 9, 0.6).apply(cv2.imdecode(np.frombuffer(template, np.uint8), 0),
                                                     CONTRACT.pad_value))
    kinds = [None, [template], [drifted]]
    alone = [infer(triton_server, [image], kind, protocol) for kind in kinds]
    with ThreadPoolExecutor(6) as pool:  # in flight together: the batcher mixes them
        futures = [pool.submit(infer, triton_server, [image], kinds[i % 3], protocol) for i in range(12)]
        for i, future in enumerate(futures):
            assert_same_answer(future.result(), alone[i % 3])
    assert alone[1]["REGISTRATION"][0, 3] > 0.9 and alone[2]["REGISTRATION"][0, 3] > 0.9
    # In one request of several images, too.
    batched = infer(triton_server, [image, image], [template, drifted], protocol)
    assert_same_answer(batched, alone[1], index_a=0)
    assert_same_answer(batched, alone[2], index_a=1)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_each_image_is_judged_at_the_deployed_threshold_of_its_kind(triton_server, pair, protocol):
    image, template = pair
    assert CONTRACT.score_threshold != CONTRACT.template_score_threshold  # else this shows nothing
    for templates, threshold in ((None, CONTRACT.score_threshold), ([template], CONTRACT.template_score_threshold)):
        everything = infer(triton_server, [image], templates, protocol, parameters={"score_threshold": 0.001})
        deployed = infer(triton_server, [image], templates, protocol)
        scores = everything["SCORES"][0, : int(everything["NUM_DETECTIONS"][0, 0])]
        kept = scores[scores > np.float32(threshold)]
        assert len(kept) and int(deployed["NUM_DETECTIONS"][0, 0]) == len(kept)
        np.testing.assert_allclose(deployed["SCORES"][0, : len(kept)], kept, atol=1e-5)
    assert deployed["REGISTRATION"][0, 3] > 0


def bad_templates(image: bytes, template: bytes, other_board: bytes) -> dict[str, tuple[bytes, str]]:
    board = cv2.imdecode(np.frombuffer(template, np.uint8), cv2.IMREAD_GRAYSCALE)
    tolerance = int(CONTRACT.registration_parameters["template_size_tolerance"])
    return {
        "not_an_image": (b"%PDF-1.7 no image", "TEMPLATE[0]: not a JPEG, PNG, BMP or TIFF image"),
        "truncated": (template[: len(template) // 2], "TEMPLATE[0]: "),
        "too_large": (png_declaring(50_000, 50_000), "over the limit"),
        "wrong_size": (png(cv2.resize(board, None, fx=0.5, fy=0.5)), f"more than the {tolerance} px tolerance"),
        "wrong_board": (other_board, "template does not match the image: score"),
        "blank": (png(np.full_like(board, 255)), "template does not match the image"),
    }


@pytest.mark.parametrize("problem", ["not_an_image", "truncated", "too_large", "wrong_size", "wrong_board", "blank"])
def test_a_bad_template_fails_its_request_alone(triton_server, pair, synthetic_boards, problem):
    image, template = pair
    other = Path(synthetic_boards[1].template_path).read_bytes()
    bad, message = bad_templates(image, template, other)[problem]
    reference = infer(triton_server, [image], [template])
    with ThreadPoolExecutor(3) as pool:
        good = [pool.submit(infer, triton_server, [image], [template]) for _ in range(2)]
        refused = pool.submit(infer, triton_server, [image], [bad])
        with pytest.raises(InferenceServerException) as error:
            refused.result()
        for future in good:
            assert_same_answer(future.result(), reference)
    assert error.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert message in error.value.message()
    assert triton_server.is_ready()
