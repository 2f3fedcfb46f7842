"""The served CPU postprocess (OpenCV NMS, whole dynamic batches) against the array code, on a live server."""
from __future__ import annotations

import json
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tools.contract import MODELS_ROOT, served_contract
from tools.pipeline_math import postprocess_as_served, preprocess_as_served

CONTRACT = served_contract("cpu")  # what the test server serves
# Per request: score_threshold (None: the served default); "bad" is refused with an error naming it.
THRESHOLDS = [None, 0.9, 0.01, 0.001, "bad", 0.3] * 3
WAVES = 5  # tries for the dynamic batcher to put several requests into one execution


@pytest.fixture(scope="module")
def detector_output(board_bytes):
    """The detector's output0 and the letterbox geometry for one board, computed here with ONNX Runtime."""
    tensor, geometry, _ = preprocess_as_served(board_bytes)
    session = ort.InferenceSession(str(MODELS_ROOT / CONTRACT.detector_model / "1" / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    (pred,) = session.run(None, {session.get_inputs()[0].name: tensor[None]})
    return pred, geometry[None]


def postprocess_request(server, pred, geometry, score_threshold):
    """One request straight to the postprocess model: its outputs, or the InferenceServerException."""
    client = grpcclient.InferenceServerClient(server.grpc_url)
    inputs = [grpcclient.InferInput(CONTRACT.detector_output, list(pred.shape), "FP32"),
              grpcclient.InferInput(CONTRACT.geometry_output, list(geometry.shape), "FP32")]
    inputs[0].set_data_from_numpy(pred)
    inputs[1].set_data_from_numpy(geometry)
    parameters = None if score_threshold is None else {"score_threshold": score_threshold}
    try:
        result = client.infer(CONTRACT.postprocess_model, inputs, parameters=parameters)
        return tuple(result.as_numpy(name) for name in CONTRACT.output_names)
    except InferenceServerException as exc:
        return exc
    finally:
        client.close()


def largest_postprocess_batch(server) -> int:
    url = f"http://{server.http_url}/v2/models/{CONTRACT.postprocess_model}/stats"
    with urllib.request.urlopen(url, timeout=10) as response:
        stats = json.load(response)["model_stats"][0]
    return max((int(batch["batch_size"]) for batch in stats["batch_stats"]), default=0)


def test_batched_requests_each_get_their_own_detections_and_errors(triton_server, detector_output):
    """Concurrent requests with different thresholds, batched together by the server, each get exactly what
    the served postprocess code gives for that request alone; the one with a bad threshold gets its own error."""
    pred, geometry = detector_output
    expected = {threshold: postprocess_as_served(pred, geometry, score_threshold=threshold)
                for threshold in set(THRESHOLDS) - {"bad"}}
    batched = False
    for _ in range(WAVES):
        with ThreadPoolExecutor(len(THRESHOLDS)) as pool:
            results = list(pool.map(lambda threshold: postprocess_request(triton_server, pred, geometry, threshold),
                                    THRESHOLDS))
        for threshold, result in zip(THRESHOLDS, results):
            if threshold == "bad":
                assert isinstance(result, InferenceServerException)
                assert "parameter 'score_threshold' must be a number between 0 and 1" in result.message()
                continue
            assert not isinstance(result, Exception), result
            for name, got, want in zip(CONTRACT.output_names, result, expected[threshold]):
                np.testing.assert_array_equal(got, want, err_msg=f"{name} at score_threshold {threshold}")
        batched = largest_postprocess_batch(triton_server) > 1
        if batched:
            break
    assert batched, f"the server never batched postprocess requests in {WAVES} waves of {len(THRESHOLDS)}"
    assert expected[0.001][0][0, 0] > expected[None][0][0, 0] > 0  # low thresholds did reach NMS and the cap
