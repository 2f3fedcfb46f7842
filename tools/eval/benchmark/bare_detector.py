"""The detector alone: the ONNX file the CPU detector config serves, on ONNX Runtime with that config's threads.

The input is the served preprocessing of real boards (``tools.data.board_batches``), so the bare figures
and the pipeline's differ only by what serving adds.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tqdm import tqdm

from tools.contract import CPU_CONFIG_NAME, ServedContract, load_repository, parameter
from tools.data.board_batches import load_boards
from tools.eval.benchmark.latency import percentiles_ms


@dataclass(frozen=True)
class ServedDetector:
    """What the CPU detector config runs: which ONNX file, with how many intra-op threads."""

    model_path: Path
    intra_op_threads: int

    @classmethod
    def from_cpu_config(cls, contract: ServedContract) -> "ServedDetector":
        config = load_repository(CPU_CONFIG_NAME, contract.models_root)[contract.detector_model]
        return cls(contract.detector_version_dir / parameter(config, "onnx_file"),
                   int(parameter(config, "intra_op_threads")))


def bare_batch_sizes(contract: ServedContract) -> list[int]:
    """Batch 1 (latency) and the batches the dynamic batcher prefers to form (throughput)."""
    return sorted({1, *contract.preferred_batch_sizes})


def open_session(detector: ServedDetector):
    """An ONNX Runtime session with the options of models/pcb_defect_detector/1/model.py (the CPU detector)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = detector.intra_op_threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(detector.model_path), options, providers=["CPUExecutionProvider"])


def time_bare_detector(detector: ServedDetector, boards: list[Path], batch_sizes: list[int],
                       warmup: int, runs: int) -> dict:
    """Latency per batch size over ``runs`` timed runs after ``warmup``; batches cycle through ``boards``."""
    session = open_session(detector)
    model_input = session.get_inputs()[0]
    # A detector of fewer channels (another model compared in the same run) takes the board channel(s) only,
    # and one with a float input the pixels in [0, 1].
    inputs = load_boards(boards)[0][:, : model_input.shape[1]]
    if model_input.type == "tensor(float)" and inputs.dtype == np.uint8:
        inputs = inputs.astype(np.float32) / np.float32(255)
    input_name = model_input.name
    results = []
    for batch in batch_sizes:
        feed = {input_name: inputs[np.arange(batch) % len(inputs)]}
        for _ in range(warmup):
            session.run(None, feed)
        timings = []
        cpu_start = time.process_time()  # every thread of this process: ONNX Runtime's intra-op pool
        for _ in tqdm(range(runs), desc=f"bare detector batch {batch}", unit="run"):
            start = time.perf_counter()
            session.run(None, feed)
            timings.append(time.perf_counter() - start)
        core_ms_per_image = 1e3 * (time.process_time() - cpu_start) / (runs * batch)
        per_batch = percentiles_ms(timings)
        results.append({
            "batch": batch,
            "p50_ms_per_batch": per_batch["p50_ms"],
            "p90_ms_per_batch": per_batch["p90_ms"],
            "p50_ms_per_image": per_batch["p50_ms"] / batch,
            "p90_ms_per_image": per_batch["p90_ms"] / batch,
            "images_per_s_at_p50": 1e3 * batch / per_batch["p50_ms"],
            "core_ms_per_image": core_ms_per_image,
        })
    return {
        "model": str(detector.model_path),
        "provider": "CPUExecutionProvider",
        "onnxruntime": ort.__version__,
        "intra_op_threads": detector.intra_op_threads,
        "warmup_runs": warmup,
        "timed_runs": runs,
        "boards": len(boards),
        "results": results,
    }
