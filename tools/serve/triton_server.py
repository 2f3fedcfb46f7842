"""Run the tritonserver bundled in the nvidia-pytriton wheel on the model repository.

Library: ``TritonServer`` is a context manager that starts the server, waits until it and the
pipeline model are ready, and always stops it (with every process it spawned).

What every server started here has (docs/operations.md):

* latency summaries (p50, p90, p99 of each model: ``nv_inference_*_summary_us``), as in the deployment;
* OpenTelemetry traces, exported over OTLP/HTTP to ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` when that standard
  variable is set (``otel_trace_settings``; a client's W3C ``traceparent`` continues into Triton); none otherwise;
* a supervisor (tools/serve/supervisor.py) that restarts a model whose Python-backend stub died or hung:
  explicit model control, its API restricted to a key only this process knows, HTTP on localhost only.

``serving`` yields the address of a given server, or of a local one started for a tool's run.
The command line (``python -m tools.serve``, what ``make serve`` runs) is in ``tools/serve/__main__.py``.
"""
from __future__ import annotations

import contextlib
import ctypes.util
import importlib.util
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from tools.contract import CPU_CONFIG_NAME, MODELS_ROOT, served_contract
from tools.serve.supervisor import ADMIN_HEADER, Supervisor

LOG_LINES = 25
PR_SET_PDEATHSIG = 1  # linux/prctl.h
# p50, p90 and p99 of every model's latencies, each with its allowed error (as in deploy/k8s/server/deployment.yaml).
METRICS_CONFIG = ("summary_latencies=true", "summary_quantiles=0.5:0.05,0.9:0.01,0.99:0.001")
OTLP_TRACES_ENDPOINT = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"  # the OpenTelemetry SDKs' standard variable
OTEL_SERVICE_NAME = "OTEL_SERVICE_NAME"
DEFAULT_SERVICE_NAME = "pcb-inspect"
TRACE_LOG_FREQUENCY = 100  # --trace-file: traces kept in memory before they are written out
# The CPU detector publishes the restart counts from the file this variable names (pcb_defect_detector/1/restart_counts.py).
RESTARTS_FILE_VARIABLE = "PCB_MODEL_RESTARTS_FILE"


def _pytriton_paths() -> tuple[Path, Path]:
    """Return (bundled tritonserver dir, its shared-library dir) without importing pytriton."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("nvidia-pytriton is not installed in this Python environment (pip install nvidia-pytriton)")
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    return package_dir / "tritonserver", package_dir.parent / "nvidia_pytriton.libs"


def free_ports(count: int) -> list[int]:
    """Return ``count`` distinct TCP ports that are free right now (all held open together so they differ)."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


class TritonServer:
    """A tritonserver process serving ``model_repository``; use as a context manager.

    ``model_config_name`` selects ``configs/<name>.pbtxt`` in each model (``None`` = default GPU configs).
    Tracing: ``trace_config`` settings (``tritonserver --trace-config`` syntax) when given, else OpenTelemetry
    when OTEL_EXPORTER_OTLP_TRACES_ENDPOINT is set (``otel_trace_settings``), else none.
    ``supervise`` (default) runs the ``Supervisor`` once the server is ready; ``supervisor`` is it then.
    HTTP listens on ``http_address`` (localhost: the model control is only reachable from this host, and only
    with ``admin_key``, random by default), gRPC and metrics on every address.
    With ``log_to_console`` the server log goes to this process's stdout; otherwise to ``log_path``.
    The server is terminated if the thread that started it exits, so start it from a long-lived thread.
    """

    def __init__(
        self,
        model_repository: Path = MODELS_ROOT,
        http_port: int = 8000,
        grpc_port: int = 8001,
        metrics_port: int = 8002,
        model_config_name: str | None = CPU_CONFIG_NAME,
        log_verbose: int = 0,
        trace_config: tuple[str, ...] | list[str] | None = None,
        ready_models: tuple[str, ...] | None = None,
        ready_timeout_s: float = 300.0,
        stop_timeout_s: float = 30.0,
        log_path: Path | None = None,
        log_to_console: bool = False,
        supervise: bool = True,
        http_address: str = "127.0.0.1",
        admin_key: str | None = None,
        supervisor_options: dict | None = None,
    ):
        self.model_repository = Path(model_repository).resolve()
        self.http_port, self.grpc_port, self.metrics_port = http_port, grpc_port, metrics_port
        self.model_config_name = model_config_name
        self.log_verbose = log_verbose
        self.trace_config = list(trace_config) if trace_config is not None else otel_trace_settings(os.environ)
        self.supervise = supervise
        self.http_address = http_address
        self.admin_key = admin_key or secrets.token_hex(16)
        self.supervisor_options = dict(supervisor_options or {})
        self.supervisor: Supervisor | None = None
        # By default the server is ready when every model of the repository is.
        self.ready_models = ready_models if ready_models is not None else (
            served_contract(model_config_name, self.model_repository).model_names)
        self.ready_timeout_s = ready_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.log_to_console = log_to_console
        self.log_path = Path(log_path) if log_path else None
        self._work_dir: Path | None = None
        self._log_file: Path | None = None
        self._process: subprocess.Popen | None = None

    @classmethod
    def on_free_ports(cls, **options) -> "TritonServer":
        """A server on HTTP, gRPC and metrics ports that are free now (for tests and the demo)."""
        http_port, grpc_port, metrics_port = free_ports(3)
        return cls(http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port, **options)

    @property
    def http_url(self) -> str:
        host = "localhost" if self.http_address in ("0.0.0.0", "::") else self.http_address
        return f"{host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"localhost:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://localhost:{self.metrics_port}/metrics"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def __enter__(self) -> "TritonServer":
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def _prepare_backends(self, server_dist: Path) -> Path:
        """Copy the Python backend plus the stub built for this interpreter into a private backend dir.

        The wheel ships one stub per Python version; the backend loads ``backends/python/triton_python_backend_stub``.
        """
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        stub = server_dist / "python_backend_stubs" / version / "triton_python_backend_stub"
        if not stub.is_file():
            raise RuntimeError(f"nvidia-pytriton has no Python backend stub for Python {version} ({stub})")
        if ctypes.util.find_library(f"python{version}") is None:
            raise RuntimeError(f"the Python backend stub needs the system library libpython{version} "
                               f"(Debian/Ubuntu: apt-get install libpython{version})")
        backends = self._work_dir / "backends"
        shutil.copytree(server_dist / "backends", backends, ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy2(stub, backends / "python" / stub.name)
        return backends

    def command(self, backend_directory: Path, server_binary: Path) -> list[str]:
        cmd = [
            str(server_binary),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={backend_directory}",
            f"--http-address={self.http_address}",
            f"--http-port={self.http_port}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-port={self.metrics_port}",
            "--allow-metrics=true",
            *(f"--metrics-config={setting}" for setting in METRICS_CONFIG),
            f"--log-verbose={self.log_verbose}",
            # Bounded shutdown: in-flight requests get this long before the server quits anyway.
            f"--exit-timeout-secs={max(1, int(self.stop_timeout_s) - 5)}",
        ]
        if self.supervise:
            # The supervisor reloads models through the repository API; nobody else may (on gRPC neither).
            restricted = f"model-repository:{ADMIN_HEADER}={self.admin_key}"
            cmd += ["--model-control-mode=explicit", "--load-model=*",
                    f"--http-restricted-api={restricted}", f"--grpc-restricted-protocol={restricted}"]
        if self.model_config_name:
            cmd.append(f"--model-config-name={self.model_config_name}")
        cmd += [f"--trace-config={setting}" for setting in self.trace_config]
        return cmd

    def _environment(self, libs_dir: Path) -> dict[str, str]:
        env = dict(os.environ)
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(libs_dir), env.get("LD_LIBRARY_PATH")]))
        # The stub runs its own interpreter, which finds this environment's packages only via PATH.
        env["PATH"] = os.pathsep.join(filter(None, [str(Path(sys.executable).parent), env.get("PATH")]))
        if self.supervise:
            env[RESTARTS_FILE_VARIABLE] = str(self.restarts_file)
        return env

    @property
    def restarts_file(self) -> Path:
        return self._work_dir / "restarts.json"

    def start(self) -> None:
        """Start the server and block until it and ``ready_models`` are ready; on failure stop it and raise."""
        if self._process is not None:
            raise RuntimeError("server already started")
        server_dist, libs_dir = _pytriton_paths()
        self._work_dir = Path(tempfile.mkdtemp(prefix="tritonserver-"))
        try:
            backends = self._prepare_backends(server_dist)
            self.restarts_file.write_text("{}")
            self._log_file = self.log_path or self._work_dir / "tritonserver.log"
            output = None if self.log_to_console else open(self._log_file, "wb")
            try:
                # Own process group, so stop() reaches the Python backend stubs too.
                self._process = subprocess.Popen(
                    self.command(backends, server_dist / "bin" / "tritonserver"),
                    env=self._environment(libs_dir),
                    stdin=subprocess.DEVNULL,
                    stdout=output,
                    stderr=subprocess.STDOUT if output else None,
                    start_new_session=True,
                    preexec_fn=_terminate_with_parent,
                )
            finally:
                if output:
                    output.close()
            self.wait_ready()
            if self.supervise:
                self.supervisor = Supervisor(self._process.pid, self.http_port, self.metrics_url, self.grpc_url,
                                             self.admin_key, self.restarts_file, self._canary_contract(),
                                             **self.supervisor_options)
                self.supervisor.start()
        except BaseException:
            self.stop()
            raise

    def _canary_contract(self):
        """The contract the canary checks, when this repository serves the pipeline (not a test's echo model)."""
        try:
            contract = served_contract(self.model_config_name, self.model_repository)
        except (ValueError, KeyError, OSError):
            return None
        return contract if contract.pipeline_model in self.ready_models else None

    def log_text(self) -> str:
        if self.log_to_console:
            return "(server log went to the console)"
        if self._log_file is None or not self._log_file.exists():
            return ""
        return self._log_file.read_text(errors="replace")

    def _failure(self, reason: str) -> RuntimeError:
        """An error carrying the log's error lines and its tail (the big status tables left out)."""
        lines = [line for line in self.log_text().splitlines() if line.strip() and not line.startswith(("|", "+"))]
        errors = [line for line in lines if line.startswith(("E", "error"))]
        return RuntimeError(f"tritonserver {reason}.\nErrors in the server log:\n" + "\n".join(errors[-LOG_LINES:])
                            + "\nLast lines of the server log:\n" + "\n".join(lines[-LOG_LINES:]))

    def is_ready(self) -> bool:
        base = f"http://localhost:{self.http_port}/v2"
        return _http_ok(f"{base}/health/ready") and all(
            _http_ok(f"{base}/models/{name}/ready") for name in self.ready_models
        )

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        while True:
            code = self._process.poll()
            if code is not None:
                raise self._failure(f"exited with code {code} before becoming ready")
            if self.is_ready():
                return
            if time.monotonic() > deadline:
                raise self._failure(f"not ready (models {', '.join(self.ready_models)}) after {self.ready_timeout_s:.0f} s")
            time.sleep(0.5)

    def stop(self) -> None:
        """Drain, SIGTERM the server, SIGKILL its whole process group if still there after ``stop_timeout_s``;
        idempotent.

        Triton 2.51 on SIGTERM stops every model's scheduler at once, so an ensemble request in flight fails at its
        next step ("Server is stopping"). With model control (``supervise``) the entry models are unloaded first,
        the scan model, then the pipeline: new requests get NOT_FOUND at once, and those accepted finish (their
        steps are still loaded) before the SIGTERM."""
        supervisor, self.supervisor = self.supervisor, None
        if supervisor is not None:
            supervisor.stop()  # no restarts while the server stops
            if self._process is not None and self._process.poll() is None:
                self._drain(max(1.0, self.stop_timeout_s - 5))
        process, self._process = self._process, None
        if process is not None:
            # The server alone gets SIGTERM: it unloads the models and ends its stubs itself.
            process.terminate()
            try:
                process.wait(timeout=self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                _signal_group(process.pid, signal.SIGKILL)
                process.wait()
            # Stubs normally exit with the server; kill any straggler still in the group.
            _signal_group(process.pid, signal.SIGKILL)
        if self._work_dir is not None:
            # Removes the copied backends and the default log (its tail is in any startup error already).
            shutil.rmtree(self._work_dir, ignore_errors=True)
            self._work_dir = None

    def wait(self) -> int:
        """Block until the server exits by itself; return its exit code."""
        return self._process.wait()

    def _repository_api(self, path: str, body: dict) -> bytes:
        request = urllib.request.Request(f"http://127.0.0.1:{self.http_port}/v2/repository{path}", method="POST",
                                         data=json.dumps(body).encode(), headers={ADMIN_HEADER: self.admin_key})
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.read()

    def _drain(self, timeout_s: float) -> None:
        """Unload the scan model, then the pipeline, each once its requests in flight are done (at most
        ``timeout_s`` in all); the steps stay loaded for them."""
        contract = self._canary_contract()
        if contract is None:
            return
        deadline = time.monotonic() + timeout_s
        try:
            for model in (contract.scan_model, contract.pipeline_model):
                self._repository_api(f"/models/{model}/unload", {"parameters": {"unload_dependents": False}})
                while time.monotonic() < deadline:
                    states = {row["name"]: row.get("state") for row in json.loads(self._repository_api("/index", {}))}
                    if states.get(model) not in ("READY", "UNLOADING"):
                        break
                    time.sleep(0.05)
        except (urllib.error.URLError, OSError, ValueError):
            pass  # the server is going anyway


def _terminate_with_parent() -> None:
    """Runs in the child before exec: SIGTERM it if the thread that started it dies (even by SIGKILL)."""
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def trace_settings(trace_file: Path | None, extra: list[str]) -> list[str]:
    """``--trace-config`` settings: with a trace file, every request's timestamps go to FILE.0, FILE.1, ... as
    each TRACE_LOG_FREQUENCY traces complete (the rest at exit), so memory stays bounded; ``extra`` come last."""
    settings = []
    if trace_file:
        settings = [f"triton,file={Path(trace_file).resolve()}", f"triton,log-frequency={TRACE_LOG_FREQUENCY}",
                    "level=TIMESTAMPS", "rate=1"]
    return settings + list(extra)


def otel_trace_settings(environment) -> list[str]:
    """OpenTelemetry ``--trace-config`` settings when OTEL_EXPORTER_OTLP_TRACES_ENDPOINT is set (every request
    traced, exported over OTLP/HTTP to that URL, service name OTEL_SERVICE_NAME or pcb-inspect); else none."""
    endpoint = environment.get(OTLP_TRACES_ENDPOINT, "").strip()
    if not endpoint:
        return []
    service = environment.get(OTEL_SERVICE_NAME, "").strip() or DEFAULT_SERVICE_NAME
    return ["mode=opentelemetry", f"opentelemetry,url={endpoint}", "rate=1", "level=TIMESTAMPS",
            f"opentelemetry,resource=service.name={service}"]


@contextlib.contextmanager
def serving(url: str, start_server: bool, model_repository: Path = MODELS_ROOT):
    """Yield the gRPC address to use: ``url`` as given, or that of a local Triton serving ``model_repository``
    for the duration (CPU configs, free ports so it never collides with a server already running)."""
    if not start_server:
        yield url
        return
    print(f"starting a local tritonserver on {model_repository} ...", flush=True)
    with TritonServer.on_free_ports(model_repository=model_repository) as server:
        yield server.grpc_url
