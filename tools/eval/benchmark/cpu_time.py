"""Where a CPU-bound machine's capacity goes: CPU time per inference of each serving process and of the load.

On a CPU server every process shares the same cores, so the pipeline's throughput at saturation is bounded by
``cores x 1000 / (core-milliseconds per inference, all processes)``. This meter reads each process's CPU time
(user + system, /proc/<pid>/stat) around one concurrency level: tritonserver (gRPC, the ensemble, the
batchers), each Python backend stub by model, and the load generator (this process and the perf_analyzer
it ran, which shares the cores with the server when both run here).
"""
from __future__ import annotations

import os
import resource

from tools.eval.benchmark.memory import LOCAL_HOSTS, PROC, listening_process, stub_processes

LOAD_GENERATOR = "load generator"
SERVER = "tritonserver"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a running process so far."""
    fields = (PROC / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime and stime, fields 14 and 15 of stat


def own_cpu_seconds() -> float:
    """This process's CPU time and that of its finished children (each level's perf_analyzer)."""
    mine, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return mine.ru_utime + mine.ru_stime + children.ru_utime + children.ru_stime


class CpuMeter:
    """CPU seconds by process group between ``start`` and ``stop``; unavailable for a server elsewhere."""

    def __init__(self, url: str):
        host, _, port = url.rpartition(":")
        server_pid = listening_process(int(port)) if host in LOCAL_HOSTS else None
        self.reason = "" if server_pid else f"the server at {url} is not a process on this machine that can be read"
        self.groups: dict[str, list[int]] = {}
        if server_pid:
            self.groups[SERVER] = [server_pid]
            for stub in stub_processes(server_pid):
                self.groups.setdefault(stub_group(stub["model"]), []).append(stub["pid"])
        self._start: dict[str, float] | None = None

    def _now(self) -> dict[str, float]:
        return {LOAD_GENERATOR: own_cpu_seconds(),
                **{group: sum(process_cpu_seconds(pid) for pid in pids) for group, pids in self.groups.items()}}

    def start(self) -> None:
        try:
            self._start = self._now()
        except OSError:  # a stub restarted (the supervisor) or the server stopped since the meter found them
            self._start = None

    def stop(self, inferences: int) -> dict:
        """CPU milliseconds per inference by group (and in all, the load generator apart) since ``start``."""
        if self.reason:
            return {"available": False, "reason": self.reason}
        try:
            now = self._now() if self._start is not None else None
        except OSError:
            now = None
        if now is None:
            return {"available": False, "reason": "a serving process exited (a stub restarted?) during the sweep"}
        spent = {group: seconds - self._start[group] for group, seconds in now.items()}
        per_inference = {group: 1e3 * seconds / inferences if inferences else 0.0 for group, seconds in spent.items()}
        serving = sum(ms for group, ms in per_inference.items() if group != LOAD_GENERATOR)
        return {"available": True, "inferences": inferences, "core_ms_per_inference": per_inference,
                "serving_core_ms_per_inference": serving}


def ceiling_per_s(core_ms_per_inference: float, cores: int) -> float:
    """Inferences/s a CPU-bound machine of ``cores`` cores reaches at most at this cost per inference."""
    return cores * 1e3 / core_ms_per_inference if core_ms_per_inference else float("inf")


def stub_group(model: str) -> str:
    return f"{model} stub"

