"""The pipeline's concurrency sweep: a load generator per level, with Triton's per-model statistics over it.

perf_analyzer is the load generator; when it cannot run here, the Python client measures instead, for the
whole sweep, and the result says so and why.
"""
from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path

from tools.contract import ServedContract
from tools.eval.benchmark.cpu_time import CpuMeter
from tools.eval.benchmark.perf_analyzer import Measurement, PerfAnalyzer, PerfAnalyzerUnavailable
from tools.eval.benchmark.python_client import PythonClientLoad
from tools.eval.benchmark.server_stats import settled_snapshot, stage_breakdown, stage_models

TARGETS = {"throughput_per_s": 500.0, "p50_ms": 50.0, "p99_ms": 100.0}  # design targets, for a GPU server
CLIENTS = ("perf_analyzer", "python")  # --client: perf_analyzer (the Python client if it cannot run), or Python


def measure_levels(load, url: str, models: list[str], concurrency: list[int]) -> list[dict]:
    """One row per concurrency level: the load generator's figures, the per-model statistics deltas and the CPU
    time per inference of each process (the last of ``models`` is the pipeline: its requests are the inferences)."""
    rows = []
    with load:
        meter = CpuMeter(url)  # once the load is up: a server started for the run has its stubs by now
        for level in concurrency:
            before = settled_snapshot(url, models)
            meter.start()
            row = load.measure(level)
            row["stages"] = stage_breakdown(before, settled_snapshot(url, models))
            row["cpu"] = meter.stop(row["stages"][models[-1]]["requests"])
            rows.append(row)
    return rows


def with_target_checks(row: dict) -> dict:
    return {
        **row,
        "meets_throughput_target": row["throughput_per_s"] > TARGETS["throughput_per_s"],
        "meets_p50_target": row["p50_ms"] < TARGETS["p50_ms"],
        "meets_p99_target": row["p99_ms"] < TARGETS["p99_ms"],
    }


def pipeline_sweep(url: str, contract: ServedContract, boards: list[Path], concurrency: list[int], client: str,
                   measurement: Measurement, score_threshold: float | None = None,
                   with_templates: bool = False) -> dict:
    """End-to-end figures per concurrency level and the stage breakdown of each; ``with_templates`` sends each
    board's template with it."""
    models = stage_models(contract)
    fallback = PythonClientLoad(url, contract, boards, measurement.python_client_seconds, score_threshold,
                                with_templates)
    load = (PerfAnalyzer(url, contract, boards, measurement, score_threshold, with_templates)
            if client == "perf_analyzer" else fallback)
    note = ""
    try:
        rows = measure_levels(load, url, models, concurrency)
    except PerfAnalyzerUnavailable as error:
        print(f"{error}\nFalling back to the Python client.", file=sys.stderr)
        load, note = fallback, f"perf_analyzer did not give figures: {error}"
        rows = measure_levels(load, url, models, concurrency)
    return {
        "tool": load.tool,
        "note": note,
        "url": url,
        "model": contract.pipeline_model,
        "stage_models": models,
        "detector_model": contract.detector_model,
        "boards": len(boards),
        "score_threshold": score_threshold,
        "with_templates": with_templates,
        "default_score_threshold": contract.template_score_threshold if with_templates else contract.score_threshold,
        "measurement": asdict(measurement),
        "targets": TARGETS,
        "results": [with_target_checks(row) for row in rows],
    }
