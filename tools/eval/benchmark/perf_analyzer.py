"""Driving the served pipeline with perf_analyzer (from tritonclient[all]) over gRPC, fed real encoded boards.

perf_analyzer needs two things besides its binary: ``libcudart.so.12`` even for CPU-only runs (from the
``nvidia-cuda-runtime-cu12`` wheel, requirements/serve.txt) and the system library ``libb64.so.0d``
(Debian's libb64-0d, which ``make`` installs). When either is missing, ``PerfAnalyzerUnavailable`` says which.
"""
from __future__ import annotations

import base64
import csv
import importlib.util
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tools.contract import ServedContract
from tools.data.deeppcb import template_path_for

TOOL = "perf_analyzer"


class PerfAnalyzerUnavailable(RuntimeError):
    """perf_analyzer cannot measure on this machine; the message names what is missing or what it printed."""


@dataclass(frozen=True)
class Measurement:
    """How long to measure each concurrency level."""

    window_ms: int  # perf_analyzer measurement window; the Python client measures 3 windows
    max_trials: int  # windows perf_analyzer may take to reach a stable figure
    stability_percent: float  # how far the last 3 windows may differ and still count as stable

    @property
    def python_client_seconds(self) -> float:
        return 3 * self.window_ms / 1e3

    def perf_analyzer_flags(self) -> list[str]:
        # Not --request-count: perf_analyzer 2.51 then divides the count by a fixed window, not by the time taken.
        return [
            "--measurement-interval", str(self.window_ms),
            "--max-trials", str(self.max_trials),
            "--stability-percentage", f"{self.stability_percent:g}",
        ]  # fmt: skip


def perf_analyzer_binary() -> Path:
    """perf_analyzer as installed by the tritonclient[all] wheel (into the environment's bin folder)."""
    beside_python = Path(sys.executable).parent / "perf_analyzer"
    found = beside_python if beside_python.exists() else shutil.which("perf_analyzer")
    if not found:
        raise PerfAnalyzerUnavailable("perf_analyzer not found: pip install -r requirements/serve.txt "
                                      "(tritonclient[all])")
    return Path(found)


def cuda_runtime_library_dir() -> Path:
    """The folder holding libcudart.so.12 in the nvidia-cuda-runtime-cu12 wheel."""
    missing = PerfAnalyzerUnavailable("perf_analyzer needs libcudart.so.12, even on CPU: pip install -r "
                                      "requirements/serve.txt (nvidia-cuda-runtime-cu12)")
    try:
        spec = importlib.util.find_spec("nvidia.cuda_runtime")
    except ModuleNotFoundError:  # find_spec imports the parent first: no nvidia namespace package at all
        raise missing from None
    if spec is None or not spec.submodule_search_locations:
        raise missing
    return Path(next(iter(spec.submodule_search_locations))) / "lib"


def perf_analyzer_environment() -> dict[str, str]:
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(cuda_runtime_library_dir()),
                                                           env.get("LD_LIBRARY_PATH")]))
    return env


def bytes_entry(encoded: bytes) -> dict:
    """One BYTES element of perf_analyzer's real-input JSON: a 4-byte little-endian length followed by the bytes,
    and that whole string is what gets base64-encoded."""
    serialized = struct.pack("<I", len(encoded)) + encoded
    return {"content": {"b64": base64.b64encode(serialized).decode("ascii")}, "shape": [1]}


def write_perf_analyzer_input(boards: list[Path], path: Path, contract: ServedContract,
                              with_templates: bool = False) -> None:
    """perf_analyzer real-input JSON: one encoded board per request (with its DeepPCB template when
    ``with_templates``), round-robin."""
    entries = []
    for board in boards:
        entry = {contract.image_input: bytes_entry(Path(board).read_bytes())}
        if with_templates:
            entry[contract.template_input] = bytes_entry(board_template(board).read_bytes())
        entries.append(entry)
    Path(path).write_text(json.dumps({"data": entries}))


def board_template(board: Path) -> Path:
    """The DeepPCB template of a benchmark board; SystemExit naming the board when it has none."""
    template = template_path_for(board)
    if template is None:
        raise SystemExit(f"{board} has no template beside it (X_test.jpg -> X_temp.jpg): cannot use --with-templates")
    return template


def failure_reason(output: str) -> str:
    """perf_analyzer's last line, which names the problem (with the package to install for libb64)."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    reason = lines[-1] if lines else "no output"
    if "libb64" in reason:
        reason += " (Debian/Ubuntu: apt-get install libb64-0d)"
    return reason


class PerfAnalyzer:
    """perf_analyzer against the pipeline, one image per request, one concurrency level per ``measure``.

    A context manager: the boards' input JSON lives in a temporary folder for the sweep.
    """

    tool = TOOL

    def __init__(self, url: str, contract: ServedContract, boards: list[Path], measurement: Measurement,
                 score_threshold: float | None = None, with_templates: bool = False):
        self.url, self.contract, self.boards = url, contract, boards
        self.measurement, self.score_threshold, self.with_templates = measurement, score_threshold, with_templates
        self._folder: tempfile.TemporaryDirectory | None = None

    def __enter__(self) -> "PerfAnalyzer":
        self._binary = perf_analyzer_binary()
        self._environment = perf_analyzer_environment()
        self._folder = tempfile.TemporaryDirectory(prefix="perf_analyzer-")
        self._input = Path(self._folder.name) / "boards.json"
        write_perf_analyzer_input(self.boards, self._input, self.contract, self.with_templates)
        return self

    def __exit__(self, *exc_info) -> None:
        self._folder.cleanup()

    def command(self, concurrency: int, csv_path: Path) -> list[str]:
        command = [
            str(self._binary), "-m", self.contract.pipeline_model, "-u", self.url, "-i", "grpc", "-b", "1",
            "--input-data", str(self._input),
            "--concurrency-range", f"{concurrency}:{concurrency}",
            "-f", str(csv_path),
            *self.measurement.perf_analyzer_flags(),
        ]  # fmt: skip
        if self.score_threshold is not None:
            # As a string: perf_analyzer 2.51 silently drops a parameter typed float; postprocess reads numbers
            # given as strings.
            command += ["--request-parameter", f"score_threshold:{self.score_threshold:g}:string"]
        return command

    def measure(self, concurrency: int) -> dict:
        """Throughput and client-side latency percentiles (ms) at one concurrency level."""
        csv_path = Path(self._folder.name) / f"concurrency_{concurrency}.csv"
        print(f"perf_analyzer concurrency {concurrency} ...", flush=True)
        try:
            completed = subprocess.run(self.command(concurrency, csv_path), env=self._environment,
                                       capture_output=True, text=True)
        except OSError as error:
            raise PerfAnalyzerUnavailable(f"cannot run {self._binary}: {error}") from error
        if completed.returncode != 0 or not csv_path.exists():
            raise PerfAnalyzerUnavailable(f"perf_analyzer failed (exit {completed.returncode}): "
                                          f"{failure_reason(completed.stdout + completed.stderr)}")
        with csv_path.open() as handle:
            row = next(csv.DictReader(handle))
        return {
            "concurrency": int(row["Concurrency"]),
            "throughput_per_s": float(row["Inferences/Second"]),
            "p50_ms": float(row["p50 latency"]) / 1e3,  # perf_analyzer reports microseconds
            "p90_ms": float(row["p90 latency"]) / 1e3,
            "p99_ms": float(row["p99 latency"]) / 1e3,
        }
