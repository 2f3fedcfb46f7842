"""The canary check: one known board through the pipeline, and its answer compared with the defects it has.

``/v2/health/ready`` stays 200 when a Python-backend stub has died (every request then fails with "Stub
process '...' is not healthy"); an inference on a known board cannot be fooled that way::

    from tools.serve.healthcheck import canary
    result = canary("localhost:8001", deadline_s=5, metrics_url="http://localhost:8002/metrics")
    result.healthy, result.verdict, str(result)

The board is ``canary/board.png`` beside this file, sent with its template ``canary/template.png`` (so the
registration is checked too: a template it refused would fail the canary); ``canary/board.json`` lists its
defects. The answer is
right when it has exactly these defects: each found with its class and IoU >= MIN_IOU (the detector scores
each over 0.8 and nothing else over 0.2, so a GPU's FP16 engine gives the same answer). The request carries
the contract's ``uncounted_parameter``: probes do not count in the pcb_* metrics.

An overloaded server answers at once with UNAVAILABLE ("Exceeds maximum queue size", or the queue timeout), or
not within the deadline; either is healthy when every step of the pipeline is still executing (its
nv_inference_exec_count, read from ``metrics_url``, grows meanwhile), and not when one has stopped: a hung
step fills its queue too.

The probes' command is ``python -m tools.healthcheck`` (tools/healthcheck.py); the local server's supervisor
(tools/serve/supervisor.py) calls ``canary`` itself.
"""
from __future__ import annotations

import functools
import json
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tools.contract import ServedContract, served_contract
from tools.detections import Detections, box_iou

CANARY_DIR = Path(__file__).resolve().parent / "canary"
MIN_IOU = 0.5
# Triton's words for a request refused by a full queue (max_queue_size) or dropped by the queue timeout.
OVERLOAD_MESSAGES = ("Exceeds maximum queue size", "Request timeout expired")
DEAD_STUB = re.compile(r"Stub process '([^']+)' is not healthy")
EXEC_COUNT = re.compile(r'^nv_inference_exec_count\{model="([^"]+)",version="[^"]*"\} (\S+)$', re.MULTILINE)
MIN_PROGRESS_WINDOW_S = 1.0  # busy or hung: watched for the rest of the deadline, at least this long


@dataclass(frozen=True)
class CanaryResult:
    """``healthy``; ``verdict``: ok, overloaded, slow, wrong answer, failed or unreachable; ``detail`` says what
    was seen; ``dead_instance``: the Python-backend instance Triton reported unhealthy, if it did; ``stalled``:
    the pipeline steps that executed nothing while the canary was refused or waited (read from the metrics)."""

    healthy: bool
    verdict: str
    detail: str
    seconds: float
    dead_instance: str | None = None
    stalled: tuple[str, ...] = ()

    def __str__(self) -> str:
        return f"{'healthy' if self.healthy else 'unhealthy'}: {self.verdict} in {self.seconds * 1000:.0f} ms: {self.detail}"


@functools.lru_cache(maxsize=1)
def canary_board() -> tuple[bytes, tuple[str, ...], np.ndarray]:
    """(encoded board, class name of each defect, their boxes (n, 4) x1 y1 x2 y2)."""
    defects = json.loads((CANARY_DIR / "board.json").read_text())["defects"]
    boxes = np.array([defect["box"] for defect in defects], np.float32).reshape(-1, 4)
    return (CANARY_DIR / "board.png").read_bytes(), tuple(defect["class"] for defect in defects), boxes


def canary_template() -> bytes:
    """The canary board's defect-free template: the canary goes through registration too."""
    return (CANARY_DIR / "template.png").read_bytes()


def answer_problem(detections: Detections, labels: tuple[str, ...]) -> str | None:
    """What is wrong with the canary board's detections, or None when they are its defects."""
    _, classes, boxes = canary_board()
    found = [labels[int(c)] if 0 <= int(c) < len(labels) else f"class {int(c)}" for c in detections.classes]
    if len(found) != len(classes):
        return f"{len(found)} defects found, the canary board has {len(classes)}"
    iou = box_iou(boxes, detections.boxes)
    for index, name in enumerate(classes):
        matches = [j for j in range(len(found)) if found[j] == name and iou[index, j] >= MIN_IOU]
        if not matches:
            return f"the {name} at {boxes[index].round().astype(int).tolist()} was not found"
    return None


def exec_counts(metrics_url: str, models: tuple[str, ...], timeout_s: float) -> dict[str, float]:
    """nv_inference_exec_count of each of ``models`` from Triton's metrics endpoint."""
    with urllib.request.urlopen(metrics_url, timeout=timeout_s) as response:
        text = response.read().decode()
    counts = {model: float(value) for model, value in EXEC_COUNT.findall(text)}
    return {model: counts.get(model, 0.0) for model in models}


def stalled_steps(metrics_url: str, steps: tuple[str, ...], before: dict[str, float], window_s: float) -> list[str]:
    """The steps whose execution count has not grown past ``before`` within ``window_s`` (0: now)."""
    end = time.monotonic() + window_s
    while True:
        now = exec_counts(metrics_url, steps, max(window_s, 1.0))
        stalled = [step for step in steps if now[step] <= before[step]]
        if not stalled or time.monotonic() >= end:
            return stalled
        time.sleep(0.05)


def _busy_verdict(verdict: str, message: str, metrics_url: str | None, steps: tuple[str, ...],
                  before: dict[str, float] | None, started: float, deadline_s: float) -> CanaryResult:
    """Refused for overload, or no answer in time: healthy while every step still executes (a busy server),
    unhealthy when one executed nothing (a hung step fills its queue too) or when that cannot be seen."""
    if metrics_url is None or before is None:
        return CanaryResult(False, verdict, f"{message} (no metrics to tell busy from hung)", time.monotonic() - started)
    window = max(MIN_PROGRESS_WINDOW_S, deadline_s - (time.monotonic() - started))
    try:
        stalled = stalled_steps(metrics_url, steps, before, window)
    except (urllib.error.URLError, OSError) as error:
        return CanaryResult(False, verdict, f"{message}; metrics unreadable ({error})", time.monotonic() - started)
    seconds = time.monotonic() - started
    if stalled:
        return CanaryResult(False, verdict, f"{message}; {', '.join(stalled)} executed nothing in {seconds:.1f} s",
                            seconds, stalled=tuple(stalled))
    return CanaryResult(True, verdict, f"{message}; every step is executing", seconds)


def canary(url: str, deadline_s: float = 5.0, contract: ServedContract | None = None,
           metrics_url: str | None = None) -> CanaryResult:
    """Send the canary board through the pipeline at ``url`` (gRPC) and judge the answer within ``deadline_s``."""
    contract = contract or served_contract()
    encoded, _, _ = canary_board()
    steps = (contract.preprocess_model, contract.detector_model, contract.postprocess_model)
    started = time.monotonic()
    before = None
    if metrics_url:
        try:
            before = exec_counts(metrics_url, steps, deadline_s)
        except (urllib.error.URLError, OSError):
            pass  # judged without them
    inputs = []
    for name, content in ((contract.image_input, encoded), (contract.template_input, canary_template())):
        data = np.empty((1, 1), dtype=object)
        data[0, 0] = content
        inputs.append(grpcclient.InferInput(name, [1, 1], "BYTES"))
        inputs[-1].set_data_from_numpy(data)
    client = grpcclient.InferenceServerClient(url)
    try:
        result = client.infer(contract.pipeline_model, inputs,
                              outputs=[grpcclient.InferRequestedOutput(name) for name in contract.output_names],
                              parameters={contract.uncounted_parameter: True}, client_timeout=deadline_s)
    except InferenceServerException as error:
        message = error.message() or str(error)
        if error.status() == "StatusCode.DEADLINE_EXCEEDED":
            return _busy_verdict("slow", f"no answer within {deadline_s:g} s", metrics_url, steps, before, started,
                                 deadline_s)
        if any(words in message for words in OVERLOAD_MESSAGES):
            return _busy_verdict("overloaded", message, metrics_url, steps, before, started, deadline_s)
        if error.status() == "StatusCode.UNAVAILABLE" and "connect" in message.lower():
            return CanaryResult(False, "unreachable", message, time.monotonic() - started)
        dead = DEAD_STUB.search(message)
        return CanaryResult(False, "failed", message, time.monotonic() - started, dead.group(1) if dead else None)
    finally:
        client.close()
    seconds = time.monotonic() - started
    (detections,) = Detections.from_padded(*(result.as_numpy(name) for name in contract.output_names))
    problem = answer_problem(detections, contract.labels)
    if problem:
        return CanaryResult(False, "wrong answer", problem, seconds)
    if seconds > deadline_s:
        return CanaryResult(False, "slow", f"answered after {seconds:.1f} s", seconds)
    return CanaryResult(True, "ok", f"{len(detections.scores)} of {len(detections.scores)} defects found", seconds)
