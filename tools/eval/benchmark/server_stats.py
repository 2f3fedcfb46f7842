"""Where the time goes inside the server: Triton's statistics API (``/v2/models/<model>/stats``), per model.

The counters are cumulative since the server started, so a level's figures are the difference of two
snapshots taken around it. Triton adds a whole execution's compute time to every request in that execution,
so for a dynamically batched model the per-request compute is the time of the batch it rode in.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import tritonclient.grpc as grpcclient

from tools.contract import ServedContract

PHASES = ("queue", "compute_input", "compute_infer", "compute_output")  # inference_stats durations per request


@dataclass(frozen=True)
class ModelCounters:
    """One model's cumulative counters at one moment."""

    requests: int  # successful requests
    request_ns: int  # their total time inside this model, queue included
    executions: int  # model executions (one per dynamic batch)
    inferences: int  # batch elements executed
    phase_ns: dict[str, int]


def stage_models(contract: ServedContract) -> list[str]:
    """The pipeline's steps in order, then the ensemble itself."""
    return [contract.preprocess_model, contract.detector_model, contract.postprocess_model, contract.pipeline_model]


def snapshot(url: str, models: list[str]) -> dict[str, ModelCounters]:
    """Each model's cumulative counters now."""
    with grpcclient.InferenceServerClient(url) as client:
        statistics = {stats.name: stats for stats in client.get_inference_statistics("").model_stats}
    missing = [model for model in models if model not in statistics]
    if missing:
        raise RuntimeError(f"the server at {url} reports no statistics for {missing}")
    counters = {}
    for model in models:
        stats = statistics[model]
        phases = stats.inference_stats
        counters[model] = ModelCounters(
            requests=phases.success.count, request_ns=phases.success.ns, executions=stats.execution_count,
            inferences=stats.inference_count, phase_ns={phase: getattr(phases, phase).ns for phase in PHASES})
    return counters


def settled_snapshot(url: str, models: list[str], at_least: dict[str, int] | None = None,
                     timeout_s: float = 10.0, poll_s: float = 0.05) -> dict[str, ModelCounters]:
    """A snapshot once the counters have caught up: each model in ``at_least`` counts at least that many
    requests and two snapshots ``poll_s`` apart agree. Why: a Python backend model reports a request's
    statistics just after sending its response, so a snapshot taken as the client returns can miss it."""
    at_least = at_least or {}
    deadline = time.monotonic() + timeout_s
    previous = snapshot(url, models)
    while True:
        time.sleep(poll_s)
        current = snapshot(url, models)
        caught_up = all(current[model].requests >= count for model, count in at_least.items())
        if (caught_up and current == previous) or time.monotonic() > deadline:
            if not caught_up:
                short = {model: (current[model].requests, count) for model, count in at_least.items()}
                raise RuntimeError(f"the server at {url} did not count the requests sent within {timeout_s} s: "
                                   f"(counted, sent) per model {short}")
            return current
        previous = current


def _ms_per(ns: int, count: int) -> float:
    return ns / count / 1e6 if count else 0.0


def stage_breakdown(before: dict[str, ModelCounters], after: dict[str, ModelCounters]) -> dict[str, dict]:
    """Per model, between two snapshots: requests, mean batch per execution and milliseconds per request."""
    breakdown = {}
    for model, end in after.items():
        start = before[model]
        requests = end.requests - start.requests
        executions = end.executions - start.executions
        breakdown[model] = {
            "requests": requests,
            "mean_batch": (end.inferences - start.inferences) / executions if executions else 0.0,
            "request_ms": _ms_per(end.request_ns - start.request_ns, requests),
            **{f"{phase}_ms": _ms_per(end.phase_ns[phase] - start.phase_ns[phase], requests) for phase in PHASES},
        }
    return breakdown
