"""The server launcher: the foreground CLI (make serve) stops cleanly, failures carry the log, tracing works."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from tools.contract import REPO_ROOT
from tools.serve.triton_server import (
    OTLP_TRACES_ENDPOINT,
    TRACE_LOG_FREQUENCY,
    TritonServer,
    free_ports,
    otel_trace_settings,
    trace_settings,
)

ECHO_MODEL = '''
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        return [pb_utils.InferenceResponse([pb_utils.Tensor("OUT", pb_utils.get_input_tensor_by_name(r, "IN").as_numpy())])
                for r in requests]
'''
ECHO_CONFIG = '''
backend: "python"
max_batch_size: 4
input [ { name: "IN" data_type: TYPE_FP32 dims: [ 2 ] } ]
output [ { name: "OUT" data_type: TYPE_FP32 dims: [ 2 ] } ]
instance_group [ { kind: KIND_CPU } ]
'''


def python_model_repository(root: Path, name: str, model_code: str) -> Path:
    """A one-model repository with a Python-backend model (CPU) running ``model_code``."""
    version = root / name / "1"
    version.mkdir(parents=True)
    (root / name / "config.pbtxt").write_text(f'name: "{name}"' + ECHO_CONFIG)
    (version / "model.py").write_text(textwrap.dedent(model_code))
    return root


def process_tree(root_pid: int) -> set[int]:
    """``root_pid`` and all its live descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            # The command name (field 2) is in parentheses and may contain spaces: parse after it.
            parent = int(stat[stat.rindex(")") + 2:].split()[1])
            children.setdefault(parent, []).append(int(entry.name))
    tree, pending = set(), [root_pid]
    while pending:
        pid = pending.pop()
        tree.add(pid)
        pending += children.get(pid, [])
    return tree


def alive(pid: int) -> bool:
    """True for a running (not zombie) process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def pid_listening_with(argument: str) -> int | None:
    """The process whose command line has ``argument``."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if argument.encode() in (entry / "cmdline").read_bytes().split(b"\0"):
                    return int(entry.name)
            except OSError:
                continue
    return None


def wait_until_ready(http_port: int, process: subprocess.Popen, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, "the serve CLI exited before the server was ready"
        try:
            with urllib.request.urlopen(f"http://localhost:{http_port}/v2/models/pcb_pipeline/ready", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError("server not ready in time")


@pytest.mark.live  # starts its own tritonserver
def test_serve_cli_stops_cleanly_on_sigterm():
    http_port, grpc_port, metrics_port = free_ports(3)
    env = dict(os.environ, HTTP_PORT=str(http_port), GRPC_PORT=str(grpc_port), METRICS_PORT=str(metrics_port))
    cli = subprocess.Popen([sys.executable, "-m", "tools.serve"], cwd=REPO_ROOT, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_until_ready(http_port, cli)
        server_pid = pid_listening_with(f"--http-port={http_port}")
        assert server_pid is not None, "tritonserver runs with the ports from the environment"
        server_processes = process_tree(server_pid)
        assert len(server_processes) >= 4, "tritonserver plus a Python-backend stub per Python model instance"

        cli.send_signal(signal.SIGTERM)
        output, _ = cli.communicate(timeout=60)
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait()
    assert cli.returncode == 0, output.decode(errors="replace")[-3000:]
    assert b"Stopping tritonserver" in output
    left = [pid for pid in server_processes if alive(pid)]
    assert not left, f"processes left after SIGTERM: {left}"


@pytest.mark.live  # starts its own tritonserver
def test_startup_failure_raises_with_the_log(tmp_path):
    repository = python_model_repository(tmp_path, "broken", 'raise ImportError("missing dependency xyz")\n')
    server = TritonServer.on_free_ports(model_repository=repository, model_config_name=None, ready_models=("broken",))
    with pytest.raises(RuntimeError, match="missing dependency xyz") as error:
        server.start()
    assert "exited with code" in str(error.value)
    assert server.pid is None


@pytest.mark.live  # starts its own tritonserver
def test_tracing_writes_request_timestamps(tmp_path):
    repository = python_model_repository(tmp_path / "models", "echo", ECHO_MODEL)
    trace_file = tmp_path / "trace.json"
    with TritonServer.on_free_ports(model_repository=repository, model_config_name=None, ready_models=("echo",),
                                    trace_config=trace_settings(trace_file, [])) as server:
        client = grpcclient.InferenceServerClient(server.grpc_url)
        request = grpcclient.InferInput("IN", [1, 2], "FP32")
        request.set_data_from_numpy(np.array([[1.5, -2.0]], np.float32))
        for _ in range(TRACE_LOG_FREQUENCY):
            result = client.infer("echo", [request])
        client.close()
        np.testing.assert_array_equal(result.as_numpy("OUT"), [[1.5, -2.0]])
        # TRACE_LOG_FREQUENCY traces complete: they are written out (FILE.0) while the server runs, not all held
        # in memory until it stops.
        first_file = trace_file.with_name(trace_file.name + ".0")
        deadline = time.monotonic() + 30
        while not first_file.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert first_file.exists(), "no trace file written while the server runs"
    records = json.loads(first_file.read_text())
    assert {"id": 1, "model_name": "echo", "model_version": 1} in records
    names = {stamp["name"] for record in records for stamp in record.get("timestamps", [])}
    assert {"REQUEST_START", "COMPUTE_START", "REQUEST_END"} <= names


def test_tracing_is_off_by_default(monkeypatch):
    monkeypatch.delenv(OTLP_TRACES_ENDPOINT, raising=False)
    server = TritonServer(http_port=1, grpc_port=2, metrics_port=3)
    command = server.command(Path("/backends"), Path("/tritonserver"))
    assert not any(arg.startswith("--trace") for arg in command)
    assert "--model-config-name=cpu" in command and "--allow-metrics=true" in command
    assert trace_settings(None, ["rate=10"]) == ["rate=10"]


def test_opentelemetry_tracing_follows_the_standard_variable(monkeypatch):
    monkeypatch.setenv(OTLP_TRACES_ENDPOINT, "http://collector:4318/v1/traces")
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    command = TritonServer(http_port=1, grpc_port=2, metrics_port=3).command(Path("/b"), Path("/tritonserver"))
    traced = [arg.removeprefix("--trace-config=") for arg in command if arg.startswith("--trace-config=")]
    assert traced == ["mode=opentelemetry", "opentelemetry,url=http://collector:4318/v1/traces", "rate=1",
                      "level=TIMESTAMPS", "opentelemetry,resource=service.name=pcb-inspect"]
    assert otel_trace_settings({}) == []
    # Explicit settings (a trace file) win over the variable.
    assert TritonServer(http_port=1, grpc_port=2, metrics_port=3, trace_config=["rate=5"]).trace_config == ["rate=5"]


def test_every_server_has_latency_summaries_and_a_supervised_model_control_on_localhost():
    server = TritonServer(http_port=1, grpc_port=2, metrics_port=3)
    command = server.command(Path("/backends"), Path("/tritonserver"))
    assert "--metrics-config=summary_latencies=true" in command
    assert any(arg.startswith("--metrics-config=summary_quantiles=") and "0.99:" in arg for arg in command)
    assert "--http-address=127.0.0.1" in command and "--model-control-mode=explicit" in command
    restricted = f"model-repository:pcb-admin-key={server.admin_key}"
    assert f"--http-restricted-api={restricted}" in command and f"--grpc-restricted-protocol={restricted}" in command
    assert len(server.admin_key) >= 32 and server.admin_key != TritonServer(http_port=1).admin_key
    unsupervised = TritonServer(http_port=1, grpc_port=2, metrics_port=3, supervise=False)
    assert not any("model-control" in arg or "restricted" in arg
                   for arg in unsupervised.command(Path("/backends"), Path("/tritonserver")))
