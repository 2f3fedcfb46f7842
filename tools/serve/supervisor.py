"""Keeping a local tritonserver serving: a dead or hung Python-backend stub is found and its model reloaded.

Triton 2.51 leaves a model READY when the stub process of one of its instances dies; every request to it then
fails with "Stub process '<instance>' is not healthy", for good. ``Supervisor`` (a thread that
``TritonServer`` starts once the server is ready) watches for that:

* every ``poll_s`` it looks at the server's stub processes (each one's command line names its model file and
  instance): an instance whose process is gone, a zombie or stopped makes its model restart;
* every ``canary_s`` it sends the canary board through the pipeline (``healthcheck.canary``, when the
  repository has the pipeline): an answer naming a dead stub restarts that model; one that is too slow, or
  refused for overload while a step executes nothing, restarts the steps that stalled (a stub hung inside
  ``execute`` looks alive from outside) when two canaries in a row found it stalled (the second is sent at once
  after the first).

A restart kills the model's unhealthy stubs (all of them for a stall), unloads the model without its
dependents and loads it again; Triton reloads the ensemble over it. That takes 1.5 to 3 s on the 2-core CPU
machine. The server runs with explicit model control for this, and its model-repository API is restricted to
a key that only this process holds (HTTP on localhost only; ``TritonServer``). Each model's restarts are
written to ``restarts_file``, which the CPU detector publishes as pcb_model_restarts_total{model}
(models/pcb_defect_detector/1/restart_counts.py, docs/operations.md).
"""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tools.contract import ServedContract
from tools.serve.healthcheck import canary

STUB_BINARY = "triton_python_backend_stub"
STUB_INSTANCE_ARGUMENT = 8  # the stub's argv: model.py, shm region, sizes, parent pid, backend dir, ?, instance
UNHEALTHY_STATES = {"Z", "X", "T", "t"}  # zombie, dead, stopped, traced
ADMIN_HEADER = "pcb-admin-key"  # the header of the restricted APIs, as in the Kubernetes deployment


@dataclass(frozen=True)
class Stub:
    """One Python-backend stub process: its model, instance name and (pid, start time) identity."""

    model: str
    instance: str
    pid: int
    start_time: int


@dataclass(frozen=True)
class Restart:
    """A restart the supervisor made: which model, why, how long until it was loaded again (s)."""

    model: str
    reason: str
    seconds: float
    at: float  # time.time()


def _stat(pid: int) -> list[str] | None:
    """/proc/<pid>/stat after the command name (fields 3...), or None when the process is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()


def server_stubs(server_pid: int) -> list[Stub]:
    """The live Python-backend stubs the server started (children of ``server_pid``)."""
    stubs = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat(int(entry.name))
        if fields is None or int(fields[1]) != server_pid:
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if len(argv) <= STUB_INSTANCE_ARGUMENT or not argv[0].endswith(STUB_BINARY.encode()):
            continue
        model = Path(argv[1].decode()).parent.parent.name  # <repository>/<model>/<version>/model.py
        stubs.append(Stub(model, argv[STUB_INSTANCE_ARGUMENT].decode(), int(entry.name), int(fields[19])))
    return stubs


def stub_state(stub: Stub) -> str | None:
    """The stub's process state letter (R, S, Z, T, ...); None when it is gone or its pid is another process."""
    fields = _stat(stub.pid)
    if fields is None or int(fields[19]) != stub.start_time:
        return None
    return fields[0]


class Supervisor(threading.Thread):
    """Watches the server with pid ``server_pid`` and restarts what stopped; ``stop()`` ends it."""

    def __init__(self, server_pid: int, http_port: int, metrics_url: str, grpc_url: str, admin_key: str,
                 restarts_file: Path, contract: ServedContract | None, poll_s: float = 0.5, canary_s: float = 10.0,
                 canary_deadline_s: float = 5.0, log=None):
        super().__init__(name="triton-supervisor", daemon=True)
        self.server_pid = server_pid
        self.base_url = f"http://127.0.0.1:{http_port}/v2"
        self.metrics_url, self.grpc_url = metrics_url, grpc_url
        self.admin_key = admin_key
        self.restarts_file = Path(restarts_file)
        self.contract = contract
        self.poll_s, self.canary_s, self.canary_deadline_s = poll_s, canary_s, canary_deadline_s
        self.log = log or (lambda line: print(f"[supervisor] {line}", file=sys.stderr, flush=True))
        self.restarts: list[Restart] = []
        self._stalled: set[str] = set()  # steps the last canary found executing nothing
        self._stopping = threading.Event()
        self._stubs = server_stubs(server_pid)
        # Every supervised model has its series from the start, at 0 until it is restarted.
        self._counts = {stub.model: 0 for stub in self._stubs}
        self._write_counts()

    def stop(self, timeout_s: float = 30.0) -> None:
        self._stopping.set()
        if self.is_alive():
            self.join(timeout_s)

    def run(self) -> None:
        next_canary = time.monotonic() + self.canary_s
        while not self._stopping.wait(self.poll_s):
            try:
                self._check_stubs()
                if self.contract is not None and time.monotonic() >= next_canary:
                    self._check_canary()
                    # A step seen stalled is looked at again at once: a hung stub is restarted within about
                    # canary_s + 2 canary deadlines (20 s), not 2 canary_s + 2 deadlines.
                    next_canary = time.monotonic() + (0 if self._stalled else self.canary_s)
            except Exception as error:  # the supervisor must outlive whatever it meets
                self.log(f"check failed: {type(error).__name__}: {error}")

    def _check_stubs(self) -> None:
        broken: dict[str, list[Stub]] = {}
        for stub in self._stubs:
            state = stub_state(stub)
            if state is None or state in UNHEALTHY_STATES:
                broken.setdefault(stub.model, []).append(stub)
        for model, stubs in broken.items():
            described = ", ".join(f"{s.instance} (pid {s.pid}, {self._describe(stub_state(s))})" for s in stubs)
            self.restart(model, f"stub {described}", kill=stubs)

    @staticmethod
    def _describe(state: str | None) -> str:
        return {None: "gone", "Z": "dead", "X": "dead", "T": "stopped", "t": "stopped"}.get(state, f"state {state}")

    def _check_canary(self) -> None:
        contract = self.contract
        result = canary(self.grpc_url, self.canary_deadline_s, contract, self.metrics_url)
        if not result.healthy:
            self.log(f"canary {result}")
        # The first stalled step in pipeline order is the hung one: the steps after it starve.
        stalled_before, self._stalled = self._stalled, set(result.stalled[:1])
        if result.healthy or self._stopping.is_set():
            return
        if result.dead_instance:
            models = {stub.model for stub in self._stubs if stub.instance == result.dead_instance}
            for model in models:
                self.restart(model, f"canary: {result.detail}",
                             kill=[s for s in self._stubs if s.instance == result.dead_instance])
            return
        for model in sorted(self._stalled & stalled_before):  # twice in a row: not a slow batch, a hung step
            self.restart(model, f"canary: {result.verdict}: {result.detail}",
                         kill=[s for s in self._stubs if s.model == model])
            self._stalled.discard(model)

    def restart(self, model: str, reason: str, kill: list[Stub] = ()) -> Restart | None:
        """Kill ``kill`` (stubs of ``model``), unload ``model`` without its dependents and load it again."""
        if self._stopping.is_set():
            return None
        started = time.monotonic()
        self._counts[model] = self._counts.get(model, 0) + 1
        self._write_counts()
        self.log(f"restarting {model}: {reason}")
        for stub in kill:
            if stub_state(stub) is not None:
                try:
                    os.kill(stub.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        try:
            self._repository(model, "unload", {"parameters": {"unload_dependents": False}})
            self._repository(model, "load", {})
        except (urllib.error.URLError, OSError) as error:
            # The dead stubs stay listed, so the next check finds them again and tries once more.
            self.log(f"reloading {model} failed: {error}; trying again in {self.poll_s:g} s")
            return None
        # The reloaded model's new stubs replace its old ones.
        self._stubs = [s for s in self._stubs if s.model != model] + [
            s for s in server_stubs(self.server_pid) if s.model == model]
        done = Restart(model, reason, time.monotonic() - started, time.time())
        self.restarts.append(done)
        self.log(f"{model} serving again after {done.seconds:.1f} s (restart {self._counts[model]})")
        return done

    def _repository(self, model: str, action: str, body: dict) -> None:
        request = urllib.request.Request(f"{self.base_url}/repository/models/{model}/{action}", method="POST",
                                         data=json.dumps(body).encode(), headers={ADMIN_HEADER: self.admin_key})
        with urllib.request.urlopen(request, timeout=300) as response:
            response.read()

    def _write_counts(self) -> None:
        partial = self.restarts_file.with_suffix(".partial")
        partial.write_text(json.dumps(self._counts))
        os.replace(partial, self.restarts_file)
