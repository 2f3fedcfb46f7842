"""PipelineClient.infer retries gRPC UNAVAILABLE and CANCELLED (a server shutting down) a bounded number of times
with backoff; nothing else is retried. A fake tritonclient stands in for the server."""
from __future__ import annotations

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

import tools.client.pipeline_client as pipeline_client
from tools.client.pipeline_client import PipelineClient
from tools.contract import served_contract

UNAVAILABLE = InferenceServerException("failed to connect to all addresses", status="StatusCode.UNAVAILABLE")
RESTRICTED = InferenceServerException("This protocol is restricted, expecting header 'triton-grpc-protocol-x'",
                                      status="StatusCode.UNAVAILABLE")
INVALID = InferenceServerException("not an image", status="StatusCode.INVALID_ARGUMENT")
CANCELLED = InferenceServerException("CANCELLED", status="StatusCode.CANCELLED")  # as seen at a server's SIGTERM


class EmptyResult:
    """One image, no detections, in the ensemble's output layout."""

    def __init__(self, contract):
        k = contract.max_detections
        count, boxes, scores, classes = contract.output_names
        self.outputs = {count: np.zeros((1, 1), np.int32), boxes: np.zeros((1, k, 4), np.float32),
                        scores: np.zeros((1, k), np.float32), classes: np.zeros((1, k), np.int32)}

    def as_numpy(self, name):
        return self.outputs[name]


class FakeClient:
    """Raises the given errors on successive infer calls, then answers."""

    def __init__(self, errors):
        self.errors = list(errors)
        self.calls = 0

    def infer(self, **request):
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return EmptyResult(served_contract())

    def close(self):
        pass


@pytest.fixture
def sleeps(monkeypatch) -> list[float]:
    waited = []
    monkeypatch.setattr(pipeline_client.time, "sleep", waited.append)
    return waited


def client_with(errors, **options) -> tuple[PipelineClient, FakeClient]:
    client = PipelineClient("localhost:1", **options)  # a gRPC channel connects lazily: nothing is contacted
    client._client.close()
    client._client = fake = FakeClient(errors)
    return client, fake


def test_unavailable_is_retried_with_growing_jittered_backoff(sleeps):
    client, fake = client_with([UNAVAILABLE] * 3, max_attempts=4, retry_backoff_s=0.1, retry_backoff_max_s=0.3)
    [detections] = client.infer([b"image"])
    assert len(detections.scores) == 0 and fake.calls == 4
    for waited, delay in zip(sleeps, (0.1, 0.2, 0.3)):  # doubling, capped at retry_backoff_max_s
        assert delay / 2 <= waited <= delay
    assert len(sleeps) == 3


def test_a_call_cancelled_by_a_stopping_server_is_retried(sleeps):
    client, fake = client_with([CANCELLED, UNAVAILABLE], max_attempts=3)
    [detections] = client.infer([b"image"])
    assert len(detections.scores) == 0 and fake.calls == 3 and len(sleeps) == 2


def test_attempts_are_bounded(sleeps):
    client, fake = client_with([UNAVAILABLE] * 5, max_attempts=3)
    with pytest.raises(InferenceServerException) as raised:
        client.infer([b"image"])
    assert raised.value is UNAVAILABLE and fake.calls == 3 and len(sleeps) == 2


@pytest.mark.parametrize("error", [INVALID, RESTRICTED], ids=["invalid-argument", "restricted-protocol"])
def test_other_errors_are_not_retried(sleeps, error):
    client, fake = client_with([error])
    with pytest.raises(InferenceServerException) as raised:
        client.infer([b"image"])
    assert raised.value is error and fake.calls == 1 and sleeps == []


def test_one_attempt_turns_retrying_off_and_bad_settings_are_refused(sleeps):
    client, fake = client_with([UNAVAILABLE], max_attempts=1)
    with pytest.raises(InferenceServerException):
        client.infer([b"image"])
    assert fake.calls == 1 and sleeps == []
    with pytest.raises(ValueError):
        PipelineClient("localhost:1", max_attempts=0)
    with pytest.raises(ValueError):
        PipelineClient("localhost:1", retry_backoff_s=2.0, retry_backoff_max_s=1.0)


IN_USE = InferenceServerException(
    "Cannot unregister shared memory region 'pcb-inspect-1', it is currently in use.", status="StatusCode.INTERNAL")


class SharedMemoryFakeClient(FakeClient):
    """Answers infer; refuses to unregister a region with the given errors first (Triton 2.51's race)."""

    def __init__(self, unregister_errors):
        super().__init__([])
        self.unregister_errors = list(unregister_errors)
        self.registered: set[str] = set()

    def register_system_shared_memory(self, name, key, byte_size):
        self.registered.add(name)

    def unregister_system_shared_memory(self, name):
        if self.unregister_errors:
            raise self.unregister_errors.pop(0)
        self.registered.discard(name)


def shared_memory_client(unregister_errors) -> tuple[PipelineClient, SharedMemoryFakeClient]:
    client = PipelineClient("localhost:1")
    client._client.close()
    client._client = fake = SharedMemoryFakeClient(unregister_errors)
    return client, fake


def test_a_region_still_held_by_the_server_is_unregistered_once_released(sleeps):
    client, fake = shared_memory_client([IN_USE, IN_USE])
    [detections] = client.infer([b"image"], shared_memory=True)
    assert len(detections.scores) == 0 and fake.registered == set() and len(sleeps) == 2


def test_other_unregister_errors_are_raised_at_once(sleeps):
    client, fake = shared_memory_client([INVALID])
    with pytest.raises(InferenceServerException) as raised:
        client.infer([b"image"], shared_memory=True)
    assert raised.value is INVALID and sleeps == []


def test_a_region_never_released_fails_after_the_timeout(sleeps, monkeypatch):
    monkeypatch.setattr(pipeline_client, "REGION_RELEASE_TIMEOUT_S", -1.0)  # already past
    client, fake = shared_memory_client([IN_USE] * 3)
    with pytest.raises(InferenceServerException, match="currently in use"):
        client.infer([b"image"], shared_memory=True)
