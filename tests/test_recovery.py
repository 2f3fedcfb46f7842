"""Servers of their own (CPU configs): the client's trace reaches every step, a killed stub is restarted within
30 s, and SIGTERM under load loses no accepted request (docs/operations.md).

The trace and killed-stub tests share one server, started with OTEL_EXPORTER_OTLP_TRACES_ENDPOINT pointing at an
OTLP/HTTP receiver here; the graceful-stop test runs ``python -m tools.serve`` (what ``make serve`` runs) and
sends it SIGTERM.
"""
from __future__ import annotations

import base64
import http.server
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
from google.protobuf import json_format
from opentelemetry import context, trace
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from tritonclient.utils import InferenceServerException

from tests.test_triton_server import wait_until_ready
from tools.client import PipelineClient
from tools.contract import MODELS_ROOT, REPO_ROOT, served_contract
from tools.serve import healthcheck
from tools.serve.supervisor import server_stubs
from tools.serve.triton_server import OTLP_TRACES_ENDPOINT, TritonServer, free_ports

CONTRACT = served_contract("cpu")
STEPS = (CONTRACT.preprocess_model, CONTRACT.detector_model, CONTRACT.postprocess_model)
RECOVERY_LIMIT_S = 30.0
ID_FIELDS = ("traceId", "spanId", "parentSpanId")
# What a request may get while a model is restarted: the dead stub named, or the pipeline briefly unloaded.
RESTART_ERRORS = ("is not healthy", "has no available versions", "is not found", "unavailable")


class OtlpReceiver(http.server.ThreadingHTTPServer):
    """An OTLP/HTTP trace receiver: each POST to /v1/traces decoded into opentelemetry-proto's message (protobuf,
    or OTLP JSON, which spells the ids in hex), its spans kept in ``spans``."""

    def __init__(self):
        self.spans, self.errors, self.lock = [], [], threading.Lock()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                try:
                    outer.receive(body, self.headers.get("Content-Type", ""))
                except Exception as error:  # shown by the test that misses the spans
                    outer.errors.append(f"{type(error).__name__}: {error}: {body[:300]!r}")
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1/traces"

    def receive(self, body: bytes, content_type: str) -> None:
        if "json" in content_type:
            document = json.loads(body)
            for resource in document.get("resourceSpans", []):
                for scope in resource.get("scopeSpans", []):
                    for span in scope.get("spans", []):
                        for key in ID_FIELDS:
                            if span.get(key):
                                span[key] = base64.b64encode(bytes.fromhex(span[key])).decode()
            request = json_format.ParseDict(document, ExportTraceServiceRequest(), ignore_unknown_fields=True)
        else:
            request = ExportTraceServiceRequest.FromString(body)
        with self.lock:
            self.spans += [span for resource in request.resource_spans for scope in resource.scope_spans
                           for span in scope.spans]

    def trace(self, trace_id: int) -> list:
        with self.lock:
            return [span for span in self.spans if span.trace_id == trace_id.to_bytes(16, "big")]


@pytest.fixture(scope="module")
def receiver():
    started = OtlpReceiver()
    yield started
    started.shutdown()


@pytest.fixture(scope="module")
def own_server(receiver):
    """A CPU server exporting traces to ``receiver`` because the standard variable says so."""
    previous = os.environ.get(OTLP_TRACES_ENDPOINT)
    os.environ[OTLP_TRACES_ENDPOINT] = receiver.url
    try:
        # Stops within 7 s: a model whose stub was killed with a request on it stays "live" in Triton until the
        # exit timeout (docs/operations.md, Graceful stop).
        server = TritonServer.on_free_ports(model_config_name="cpu", stop_timeout_s=12)
    finally:
        if previous is None:
            del os.environ[OTLP_TRACES_ENDPOINT]
        else:
            os.environ[OTLP_TRACES_ENDPOINT] = previous
    with server:
        yield server


def board() -> bytes:
    return healthcheck.canary_board()[0]


def traced_request(server, trace_id: int, span_id: int):
    """One pipeline request while the caller's span (trace_id, span_id) is active."""
    parent = trace.NonRecordingSpan(trace.SpanContext(trace_id, span_id, is_remote=False,
                                                      trace_flags=trace.TraceFlags(trace.TraceFlags.SAMPLED)))
    token = context.attach(trace.set_span_in_context(parent))
    try:
        with PipelineClient(server.grpc_url, contract=CONTRACT, max_attempts=1) as client:
            [detections] = client.infer([board()], templates=[healthcheck.canary_template()])
    finally:
        context.detach(token)
    assert len(detections) == len(healthcheck.canary_board()[1])


@pytest.mark.live  # its own server
def test_the_clients_trace_continues_through_the_ensemble_and_every_step(own_server, receiver):
    """Triton 2.51 now and then (1 request in 20 measured) starts a trace of its own instead of continuing the
    caller's: three requests, of which one continued trace must hold every span."""
    callers = [(random.getrandbits(128), random.getrandbits(64)) for _ in range(3)]
    for trace_id, span_id in callers:
        traced_request(own_server, trace_id, span_id)
    wanted = {"InferRequest", CONTRACT.pipeline_model, *STEPS}
    deadline = time.monotonic() + 20  # Triton's exporter sends in batches, every 5 s
    while time.monotonic() < deadline:
        complete = [(trace_id, span_id) for trace_id, span_id in callers
                    if wanted <= {span.name for span in receiver.trace(trace_id)}]
        if complete:
            break
        time.sleep(0.2)
    assert complete, receiver.errors
    trace_id, span_id = complete[0]
    spans = {span.name: span for span in receiver.trace(trace_id)}
    request = spans["InferRequest"]
    assert request.parent_span_id == span_id.to_bytes(8, "big")  # a child of the client's span
    assert spans[CONTRACT.pipeline_model].parent_span_id == request.span_id
    for step in STEPS:
        assert spans[step].parent_span_id == spans[CONTRACT.pipeline_model].span_id, step


def metrics_answer(server) -> bool:
    try:
        with urllib.request.urlopen(server.metrics_url, timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


def restarts(server) -> dict[str, float]:
    with urllib.request.urlopen(server.metrics_url, timeout=5) as response:
        lines = response.read().decode().splitlines()
    return {line.split('"')[1]: float(line.rsplit(" ", 1)[1]) for line in lines
            if line.startswith("pcb_model_restarts_total{")}


@pytest.mark.live  # its own server
def test_a_killed_stub_is_restarted_and_the_rest_is_unaffected(own_server):
    scan_stubs = {(s.instance, s.pid) for s in server_stubs(own_server.pid) if s.model == CONTRACT.scan_model}
    recovery = {}
    with PipelineClient(own_server.grpc_url, contract=CONTRACT, max_attempts=1, timeout_s=10) as client:
        # Each step's stub killed, then one stopped (SIGSTOP: alive, answering nothing, as a hung stub).
        for step, sig in [(step, signal.SIGKILL) for step in STEPS] + [(STEPS[2], signal.SIGSTOP)]:
            (stub,) = [s for s in server_stubs(own_server.pid) if s.model == step]
            os.kill(stub.pid, sig)
            killed, errors = time.monotonic(), []
            while True:
                assert time.monotonic() - killed < RECOVERY_LIMIT_S, f"{step} not serving again: {errors[-3:]}"
                try:
                    client.infer([board()])
                    break
                except InferenceServerException as error:
                    errors.append(error.message() or str(error))
                assert metrics_answer(own_server)
                time.sleep(0.2)
            recovery[f"{step} ({sig.name})"] = time.monotonic() - killed
            unclear = [e for e in errors if not any(words in e.lower() for words in RESTART_ERRORS)]
            assert not unclear, unclear
    print(f"serving again after a killed stub: {', '.join(f'{m} {s:.1f} s' for m, s in recovery.items())}")
    assert {(s.instance, s.pid) for s in server_stubs(own_server.pid) if s.model == CONTRACT.scan_model} == scan_stubs
    counted = restarts(own_server)
    assert counted == {**{step: 1 for step in STEPS}, STEPS[2]: 2, CONTRACT.scan_model: 0}, counted
    assert [r.model for r in own_server.supervisor.restarts] == [*STEPS, STEPS[2]]
    assert healthcheck.canary(own_server.grpc_url, 10, CONTRACT).verdict == "ok"


@pytest.mark.live  # starts its own server (python -m tools.serve, what make serve runs)
def test_sigterm_under_load_loses_no_accepted_request():
    """4 clients keep sending while ``python -m tools.serve`` gets SIGTERM: every request sent before the signal
    is answered; one sent after is answered or refused (the pipeline unloaded: NOT_FOUND; the server going: no
    connection, the stream closed unanswered, or the call cancelled as the gRPC server shuts down: CANCELLED,
    which the client retries; 4 clients nearly fill the detector's 1 s queue on 2 cores, so the drain's own work
    can push one past it: UNAVAILABLE "Request timeout expired", the overload refusal, also retried), never taken
    and then failed ("Server is stopping", a stub error). With ``--no-supervisor`` (no drain before Triton's own
    SIGTERM handling) this fails: requests in flight get "Server is stopping"."""
    http_port, grpc_port, metrics_port = free_ports(3)
    environment = dict(os.environ, HTTP_PORT=str(http_port), GRPC_PORT=str(grpc_port), METRICS_PORT=str(metrics_port))
    environment.pop(OTLP_TRACES_ENDPOINT, None)
    serve = subprocess.Popen([sys.executable, "-m", "tools.serve"], cwd=REPO_ROOT, env=environment,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    outcomes, lock, stop = [], threading.Lock(), threading.Event()

    def client_loop():
        with PipelineClient(f"localhost:{grpc_port}", contract=CONTRACT, max_attempts=1, timeout_s=30) as client:
            while not stop.is_set():
                sent = time.monotonic()
                try:
                    client.infer([board()] * 2)
                    outcome = ("ok", "")
                except InferenceServerException as error:
                    outcome = (error.status(), error.message() or "")
                with lock:
                    outcomes.append((sent, *outcome))
                if outcome[0] != "ok":
                    time.sleep(0.05)

    threads = [threading.Thread(target=client_loop) for _ in range(4)]
    try:
        wait_until_ready(http_port, serve)
        for thread in threads:
            thread.start()
        time.sleep(2)
        stopping = time.monotonic()
        serve.send_signal(signal.SIGTERM)
        output, _ = serve.communicate(timeout=60)
    finally:
        stop.set()
        for thread in threads:
            if thread.ident is not None:  # started
                thread.join(60)
        if serve.poll() is None:
            serve.kill()
            serve.wait()
    assert serve.returncode == 0 and b"Stopping tritonserver" in output, output.decode(errors="replace")[-3000:]
    before = [status for sent, status, _ in outcomes if sent < stopping]
    assert before and set(before) == {"ok"}, [o for o in outcomes if o[0] < stopping and o[1] != "ok"]
    refused = ("unknown model", "failed to connect", "stream removed", "socket closed",
               *(words.lower() for words in healthcheck.OVERLOAD_MESSAGES))
    lost = [(status, message) for sent, status, message in outcomes if sent >= stopping and status != "ok"
            and status != "StatusCode.CANCELLED"
            and not (status in ("StatusCode.NOT_FOUND", "StatusCode.UNAVAILABLE")
                     and any(words in message.lower() for words in refused))]
    assert not lost, lost


HANG_ONCE = '''

# Added by tests/test_recovery.py: the first execution after {marker} appears hangs for good (the marker is
# consumed, so the model reloaded by the supervisor answers again).
def _hang_once(execute):
    def hanging(self, requests):
        import os
        import time
        if os.path.exists({marker!r}):
            os.remove({marker!r})
            while True:
                time.sleep(1)
        return execute(self, requests)
    return hanging


TritonPythonModel.execute = _hang_once(TritonPythonModel.execute)
'''


@pytest.mark.live  # starts its own server
def test_a_stub_hung_inside_execute_is_restarted_within_30_s(tmp_path):
    """A stub that is alive but never returns from ``execute`` (the process looks healthy): the supervisor's
    canary sees that postprocess executes nothing, twice in a row, and restarts it."""
    repository = tmp_path / "models"
    shutil.copytree(MODELS_ROOT, repository, ignore=shutil.ignore_patterns("__pycache__", "*.fp16.onnx"))
    marker = tmp_path / "hang"
    step = CONTRACT.postprocess_model
    model_file = repository / step / "1" / "model.py"
    model_file.write_text(model_file.read_text() + HANG_ONCE.format(marker=str(marker)))
    with TritonServer.on_free_ports(model_repository=repository, model_config_name="cpu", stop_timeout_s=12) as server, \
            PipelineClient(server.grpc_url, contract=CONTRACT, max_attempts=1, timeout_s=3) as client:
        client.infer([board()])
        (stub,) = [s for s in server_stubs(server.pid) if s.model == step]
        marker.touch()
        hung, errors = time.monotonic(), []
        while True:
            assert time.monotonic() - hung < RECOVERY_LIMIT_S, f"{step} not serving again: {errors[-3:]}"
            try:
                client.infer([board()])
                if not marker.exists():  # the hung stub took the marker: this answer is from the new one
                    break
            except InferenceServerException as error:
                errors.append(error.message() or str(error))
            time.sleep(0.2)
        print(f"serving again {time.monotonic() - hung:.1f} s after {step}'s stub hung")
        assert not marker.exists()
        assert [r.model for r in server.supervisor.restarts] == [step]
        assert "canary" in server.supervisor.restarts[0].reason
        assert stub.pid not in {s.pid for s in server_stubs(server.pid)}
