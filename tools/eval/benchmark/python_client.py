"""Fallback load generator for when perf_analyzer cannot run: the project's gRPC client, one thread per
concurrent request. Its figures include Python's own overhead, so the report labels them as the fallback."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tools.client.pipeline_client import PipelineClient
from tools.contract import ServedContract
from tools.eval.benchmark.latency import percentiles_ms
from tools.eval.benchmark.perf_analyzer import board_template

TOOL = "python-client fallback"


class PythonClientLoad:
    """``concurrency`` threads, each with its own client, send one board per request back to back for
    ``seconds``; throughput counts completed requests. Same interface as ``PerfAnalyzer``."""

    tool = TOOL

    def __init__(self, url: str, contract: ServedContract, boards: list[Path], seconds: float,
                 score_threshold: float | None = None, with_templates: bool = False):
        self.url, self.contract, self.seconds, self.score_threshold = url, contract, seconds, score_threshold
        self.encoded = [Path(board).read_bytes() for board in boards]
        self.templates = [board_template(board).read_bytes() for board in boards] if with_templates else None

    def __enter__(self) -> "PythonClientLoad":
        return self

    def __exit__(self, *exc_info) -> None:
        pass

    def _send_back_to_back(self, first: int, step: int, deadline: float, latencies: list[float],
                           lock: threading.Lock) -> None:
        """One thread: boards ``first``, ``first + step``, ... one per request until ``deadline``."""
        with PipelineClient(self.url, contract=self.contract) as client:
            self._send(client, first)  # warm-up, not timed
            sent = first
            while time.perf_counter() < deadline:
                start = time.perf_counter()
                self._send(client, sent)
                with lock:
                    latencies.append(time.perf_counter() - start)
                sent += step

    def _send(self, client: PipelineClient, board: int) -> None:
        board %= len(self.encoded)
        client.infer([self.encoded[board]], self.score_threshold,
                     templates=[self.templates[board]] if self.templates else None)

    def measure(self, concurrency: int) -> dict:
        print(f"python client concurrency {concurrency} ...", flush=True)
        latencies: list[float] = []
        lock = threading.Lock()
        began = time.perf_counter()
        with ThreadPoolExecutor(concurrency, "benchmark-client") as pool:
            senders = [pool.submit(self._send_back_to_back, i, concurrency, began + self.seconds, latencies, lock)
                       for i in range(concurrency)]
            for sender in senders:
                sender.result()  # a failed request ends the measurement with its error
        elapsed = time.perf_counter() - began
        return {"concurrency": concurrency, "throughput_per_s": len(latencies) / elapsed, **percentiles_ms(latencies)}
