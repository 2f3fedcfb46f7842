"""Operating the server (docs/operations.md): the pcb_* metrics, the canary check, bounded queues, trace context.

Static checks, then live ones on the shared server (the ``triton_server`` fixture, CPU configs). The tests that
need a server of their own (a killed stub, SIGTERM under load, OTLP traces) are in tests/test_recovery.py.
"""
from __future__ import annotations

import ast
import http.server
import re
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from tests.encoded_images import png_declaring
from tools.client import PipelineClient
from tools.client.tracing import environment_context, trace_headers
from tools.contract import CONFIG_NAMES, MODELS_ROOT, REPO_ROOT, load_repository, parameter, served_contract
from tools.detections import Detections
from tools.pipeline_math import image_ops, load_model_module, registration
from tools.serve import healthcheck
from tools.serve.triton_server import RESTARTS_FILE_VARIABLE

CONTRACT = served_contract("cpu")
OPERATIONS = (REPO_ROOT / "docs" / "operations.md").read_text()
DASHBOARD = (REPO_ROOT / "deploy" / "k8s" / "base" / "grafana-dashboard-pcb-inspect.json").read_text()
RULES = (REPO_ROOT / "deploy" / "k8s" / "base" / "prometheus-rule.yaml").read_text()
MODEL_FILES = sorted(MODELS_ROOT.glob("*/1/*.py"))  # the models and their helpers
STEPS = (CONTRACT.preprocess_model, CONTRACT.detector_model, CONTRACT.postprocess_model)


# ---- the metrics, statically ------------------------------------------------------------------------------

def metric_families() -> dict[str, set[tuple[str, str, str]]]:
    """{metric name: {(model file, kind, description)}} of every pb_utils.MetricFamily(...) in the models."""
    found: dict[str, set] = {}
    for path in MODEL_FILES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "pb_utils.MetricFamily":
                options = {k.arg: ast.unparse(k.value) for k in node.keywords}
                kind = options["kind"].split(".")[-1].upper()  # pb_utils.MetricFamily.COUNTER, or a local alias
                found.setdefault(ast.literal_eval(options["name"]), set()).add(
                    (path.parent.parent.name, kind, options["description"]))
    return found


def module_constant(path: Path, name: str):
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and [ast.unparse(t) for t in node.targets] == [name]:
            return ast.literal_eval(node.value)
    raise KeyError(f"{path}: no {name}")


def test_each_metric_is_declared_alike_wherever_it_is_and_documented():
    families = metric_families()
    assert {"pcb_inspected_images_total", "pcb_defects_total", "pcb_rejected_images_total", "pcb_defects_per_image",
            "pcb_model_restarts_total", "pcb_template_match_score"} == set(families)
    for name, declarations in families.items():
        assert len({(kind, description) for _, kind, description in declarations}) == 1, name
        assert f"`{name}`" in OPERATIONS, f"{name} is not in docs/operations.md"
    # The dashboard and the alerts use only metrics that exist.
    used = set(re.findall(r"\b(pcb_[a-z_]+?)(?:_bucket|_count|_sum)?\b(?=\{|\[|\))", DASHBOARD + RULES))
    used -= {"pcb_queue_time_per_request_us"}  # the HPA's metric, recorded by the PrometheusRule
    assert used <= set(families), used - set(families)


def rejection_reasons(monkeypatch) -> set[str]:
    """Every reason label the models can give, from the helpers' and models' constants."""
    monkeypatch.syspath_prepend(str(MODELS_ROOT / CONTRACT.scan_model / "1"))  # scan.py imports tiling beside it
    scan = load_model_module(CONTRACT.scan_model, "scan")
    model = MODELS_ROOT / CONTRACT.scan_model / "1" / "model.py"
    post = MODELS_ROOT / CONTRACT.postprocess_model / "1" / "model.py"
    return {*image_ops.REJECTION_REASONS, *registration.REJECTION_REASONS, *scan.REJECTION_REASONS,
            module_constant(post, "BAD_PARAMETER"), module_constant(model, "BAD_PARAMETER"),
            module_constant(model, "TOO_MANY_DEFECTS")}


def test_every_rejection_reason_is_documented_and_named_by_its_error_path(monkeypatch):
    reasons = rejection_reasons(monkeypatch)
    assert reasons == {"empty", "not_an_image", "truncated", "too_large", "bad_parameter", "too_many_defects",
                       "bad_template", "template_mismatch"}
    documented = set(re.findall(r"^\| `([a-z_]+)` \|", OPERATIONS, re.MULTILINE))
    assert reasons <= documented
    jpeg = image_ops.cv2.imencode(".jpg", np.full((32, 32), 200, np.uint8))[1].tobytes()
    for data, reason in [(b"", "empty"), (b"%PDF-1.7", "not_an_image"), (jpeg[:40], "truncated"),
                         (jpeg[: len(jpeg) // 2], "truncated"), (png_declaring(9000, 9000), "too_large")]:
        with pytest.raises(image_ops.ImageRejected) as rejected:
            image_ops.decode_image(data, 1, 40_000_000)
        assert rejected.value.reason == reason, data[:8]


@pytest.mark.parametrize("config_name", CONFIG_NAMES, ids=["default", "cpu"])
def test_metric_parameters_agree_between_the_models(config_name):
    configs = load_repository(config_name)
    counting = (CONTRACT.postprocess_model, CONTRACT.scan_model)
    for model in counting:
        assert MODELS_ROOT / parameter(configs[model], "labels_file") == \
            CONTRACT.detector_version_dir / "labels.txt", model
    buckets = {parameter(configs[model], "defects_per_image_buckets") for model in counting}
    assert len(buckets) == 1
    edges = [float(edge) for edge in buckets.pop().split(",")]
    assert edges == sorted(set(edges)) and edges[0] == 0
    assert edges[-1] >= tensor_rows(configs[CONTRACT.scan_model])  # a scan's K
    marked = (CONTRACT.preprocess_model, CONTRACT.postprocess_model, CONTRACT.scan_model)
    assert {parameter(configs[model], "uncounted_parameter") for model in marked} == {CONTRACT.uncounted_parameter}


def tensor_rows(config) -> int:
    return next(o.dims[0] for o in config.output if o.name == CONTRACT.output_names[1])


def test_the_restart_counts_are_published_by_one_model_that_reads_the_supervisors_variable():
    publishers = {model for name, declarations in metric_families().items() if name == "pcb_model_restarts_total"
                  for model, _, _ in declarations}
    assert publishers == {CONTRACT.detector_model}  # the CPU detector: every request passes through it
    helper = MODELS_ROOT / CONTRACT.detector_model / "1" / "restart_counts.py"
    assert module_constant(helper, "RESTARTS_FILE_VARIABLE") == RESTARTS_FILE_VARIABLE


# ---- bounded queues ------------------------------------------------------------------------------------

@pytest.mark.parametrize("config_name", CONFIG_NAMES, ids=["default", "cpu"])
def test_every_queue_is_bounded_and_rejects_at_once(config_name):
    configs = load_repository(config_name)
    for model in (*STEPS, CONTRACT.scan_model):
        policy = configs[model].dynamic_batching.default_queue_policy
        assert policy.max_queue_size > 0 and policy.timeout_action == policy.REJECT, model
        assert policy.default_timeout_microseconds > 0, model
    # The detector's queue has room for every tile request the scans may have in flight, and more.
    scan = configs[CONTRACT.scan_model]
    tile_requests = sum(g.count for g in scan.instance_group) * int(parameter(scan, "requests_in_flight"))
    assert configs[CONTRACT.detector_model].dynamic_batching.default_queue_policy.max_queue_size > tile_requests


# ---- the canary's judgement, without a server ------------------------------------------------------------

def canary_detections(drop: int | None = None, extra: bool = False) -> Detections:
    _, classes, boxes = healthcheck.canary_board()
    ids = [CONTRACT.labels.index(name) for name in classes]
    keep = [i for i in range(len(ids)) if i != drop]
    boxes, ids = boxes[keep] + 1.5, [ids[i] for i in keep]
    if extra:
        boxes, ids = np.vstack([boxes, [[1, 1, 20, 20]]]), ids + [0]
    return Detections.of(boxes, np.full(len(ids), 0.9), ids)


def test_the_canary_answer_must_be_the_boards_defects():
    assert healthcheck.answer_problem(canary_detections(), CONTRACT.labels) is None
    assert "7 defects found" in healthcheck.answer_problem(canary_detections(drop=0), CONTRACT.labels)
    assert "9 defects found" in healthcheck.answer_problem(canary_detections(extra=True), CONTRACT.labels)
    wrong_class = canary_detections()
    wrong_class.classes[0] = (wrong_class.classes[0] + 1) % len(CONTRACT.labels)
    assert "was not found" in healthcheck.answer_problem(wrong_class, CONTRACT.labels)


class FakeMetrics(http.server.ThreadingHTTPServer):
    """Serves nv_inference_exec_count for the steps; ``growing`` ones execute between two reads."""

    def __init__(self, growing: set[str]):
        self.growing, self.reads = growing, 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                outer.reads += 1
                body = "".join(f'nv_inference_exec_count{{model="{m}",version="1"}} '
                               f'{10 + (outer.reads if m in outer.growing else 0)}\n' for m in STEPS)
                self.send_response(200)
                self.end_headers()
                self.wfile.write(body.encode())

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/metrics"


@pytest.mark.parametrize("growing,healthy,stalled", [(set(STEPS), True, ()),
                                                     ({STEPS[0]}, False, STEPS[1:])])
def test_overload_is_healthy_while_every_step_executes(growing, healthy, stalled):
    metrics = FakeMetrics(growing)
    try:
        before = healthcheck.exec_counts(metrics.url, STEPS, 2)
        result = healthcheck._busy_verdict("overloaded", "Exceeds maximum queue size", metrics.url, STEPS, before,
                                           time.monotonic(), 1.0)
    finally:
        metrics.shutdown()
    assert result.healthy is healthy and result.stalled == stalled and result.verdict == "overloaded"


# ---- trace context from the client ---------------------------------------------------------------------

def test_requests_carry_the_callers_trace_context():
    from opentelemetry import context, trace

    assert trace_headers() is None  # no active span
    span = trace.NonRecordingSpan(trace.SpanContext(0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331,
                                                    is_remote=False, trace_flags=trace.TraceFlags(1)))
    token = context.attach(trace.set_span_in_context(span))
    try:
        assert trace_headers() == {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
    finally:
        context.detach(token)
    parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    with environment_context({"TRACEPARENT": parent}):
        assert trace_headers() == {"traceparent": parent}
    assert trace_headers() is None


# ---- live, on the shared server ------------------------------------------------------------------------

def pcb_metrics(server) -> dict[str, float]:
    """Every pcb_* series on the metrics endpoint: {'name{labels}': value}."""
    with urllib.request.urlopen(server.metrics_url, timeout=10) as response:
        lines = response.read().decode().splitlines()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith("pcb_")}


def changes(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {key: after[key] - before.get(key, 0.0) for key in after if after[key] != before.get(key, 0.0)}


def test_the_metrics_count_what_the_responses_said(triton_server, synthetic_boards):
    boards = [Path(sample.image_path).read_bytes() for sample in synthetic_boards[:3]]
    templates = [Path(sample.template_path).read_bytes() for sample in synthetic_boards[:3]]
    scan_image, _, _ = healthcheck.canary_board()
    before = pcb_metrics(triton_server)
    answered: list[Detections] = []
    with PipelineClient(triton_server.grpc_url, contract=CONTRACT, max_attempts=1) as client:
        answered += client.infer(boards[:2]) + client.infer(boards[2:])  # a batch of two, then one
        answered += client.infer([scan_image], scans=True)  # a scan counts once, with its merged defects
        registered = client.infer(boards[:2], templates=templates[:2])  # two template scores observed
        answered += registered
        bad = [([b""], {}), ([b"%PDF-1.7"], {}), ([boards[0][:200]], {}), ([png_declaring(9000, 9000)], {}),
               ([boards[0]], {"score_threshold": 2.0}), ([b""], {"scans": True}),
               ([boards[0]], {"templates": [b"%PDF-1.7"]}), ([boards[0]], {"templates": [templates[1]]})]
        for images, options in bad:
            with pytest.raises(InferenceServerException):
                client.infer(images, **options)
    healthcheck.canary(triton_server.grpc_url, 10, CONTRACT)  # the canary's requests are left out
    delta = changes(before, pcb_metrics(triton_server))

    assert delta.pop("pcb_inspected_images_total") == len(answered)
    found = np.bincount(np.concatenate([d.classes for d in answered]), minlength=len(CONTRACT.labels))
    for index, name in enumerate(CONTRACT.labels):
        assert delta.pop(f'pcb_defects_total{{class="{name}"}}', 0) == found[index], name
    assert delta.pop("pcb_defects_per_image_count") == len(answered)
    assert delta.pop("pcb_defects_per_image_sum") == sum(len(d) for d in answered)
    for key in [k for k in delta if k.startswith("pcb_defects_per_image_bucket")]:
        edge = float(re.search(r'le="([^"]+)"', key).group(1).replace("+Inf", "inf"))
        assert delta.pop(key) == sum(len(d) <= edge for d in answered), key
    scores = [float(d.registration[3]) for d in registered]
    assert delta.pop("pcb_template_match_score_count") == 2
    assert abs(delta.pop("pcb_template_match_score_sum") - sum(scores)) < 1e-3
    for key in [k for k in delta if k.startswith("pcb_template_match_score_bucket")]:
        edge = float(re.search(r'le="([^"]+)"', key).group(1).replace("+Inf", "inf"))
        assert delta.pop(key) == sum(score <= edge for score in scores), key
    assert delta == {f'pcb_rejected_images_total{{reason="{reason}"}}': count for reason, count in
                     {"empty": 2, "not_an_image": 1, "truncated": 1, "too_large": 1, "bad_parameter": 1,
                      "bad_template": 1, "template_mismatch": 1}.items()}


def test_latency_percentiles_are_on_the_metrics_endpoint(triton_server):
    with urllib.request.urlopen(triton_server.metrics_url, timeout=10) as response:
        text = response.read().decode()
    series = re.findall(r"^nv_inference_request_summary_us\{([^}]*)\}", text, re.MULTILINE)
    quantiles = {dict(re.findall(r'(\w+)="([^"]*)"', labels)).get("quantile") for labels in series
                 if f'model="{CONTRACT.pipeline_model}"' in labels}
    assert {"0.5", "0.9", "0.99"} <= quantiles


def run_healthcheck(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tools.healthcheck", *arguments], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=60)


def test_the_healthcheck_command_passes_on_a_healthy_server_and_fails_without_one(triton_server):
    metrics = triton_server.metrics_url
    healthy = run_healthcheck("--url", triton_server.grpc_url, "--metrics-url", metrics, "--deadline-ms", "10000")
    assert healthy.returncode == 0, healthy.stdout + healthy.stderr
    assert healthy.stdout.startswith("healthy: ok") and "8 of 8 defects" in healthy.stdout
    down = run_healthcheck("--url", "localhost:1", "--metrics-url", "none", "--deadline-ms", "2000")
    assert down.returncode == 1 and down.stdout.startswith("unhealthy: unreachable"), down.stdout


def test_overload_is_refused_as_unavailable_and_the_server_keeps_serving(triton_server, board_bytes):
    """More work at once than the detector does within its queue timeout (64 requests of 4 boards, about 3 s on
    2 cores): the excess gets UNAVAILABLE naming the queue bound, the rest their answers, and the canary calls
    the busy server healthy. (How soon a refusal comes is measured by python -m tools.soak, not asserted.)"""
    outcomes, verdicts = [], []

    def one(_):
        started = time.monotonic()
        try:
            with PipelineClient(triton_server.grpc_url, contract=CONTRACT, max_attempts=1) as client:
                client.infer([board_bytes] * 4)
            outcomes.append(("ok", time.monotonic() - started, ""))
        except InferenceServerException as error:
            outcomes.append((error.status(), time.monotonic() - started, error.message()))

    with ThreadPoolExecutor(64) as pool:
        futures = [pool.submit(one, i) for i in range(64)]
        verdicts.append(healthcheck.canary(triton_server.grpc_url, 10, CONTRACT, triton_server.metrics_url))
        for future in futures:
            future.result()
    refused = [(seconds, message) for status, seconds, message in outcomes if status == "StatusCode.UNAVAILABLE"]
    assert refused, "64 requests of 4 images at once must outlast the detector's queue timeout"
    assert all(any(words in message for words in healthcheck.OVERLOAD_MESSAGES) for _, message in refused)
    assert {status for status, _, _ in outcomes} <= {"ok", "StatusCode.UNAVAILABLE"}
    assert "ok" in {status for status, _, _ in outcomes}  # the server answers what it can, and refuses the rest
    assert verdicts[0].healthy, verdicts[0]
    assert healthcheck.canary(triton_server.grpc_url, 10, CONTRACT).verdict == "ok"


def test_the_metrics_helper_two_model_folders_carry_is_the_same_file():
    """Model folders are self-contained, so postprocess and pcb_scan (the two that count images answered) each
    carry inspection_metrics.py: the copies must not drift apart, and no other model carries one."""
    copies = sorted(MODELS_ROOT.glob("*/1/inspection_metrics.py"))
    assert {path.parent.parent.name for path in copies} == {CONTRACT.postprocess_model, CONTRACT.scan_model}
    assert copies[0].read_bytes() == copies[1].read_bytes()


def test_the_registration_two_model_folders_carry_is_the_same_file():
    """preprocess registers a template onto its image, pcb_scan a scan's template onto the whole scan first:
    each carries registration.py (self-contained folders), the copies the same, and no other model one."""
    copies = sorted(MODELS_ROOT.glob("*/1/registration.py"))
    assert {path.parent.parent.name for path in copies} == {CONTRACT.preprocess_model, CONTRACT.scan_model}
    assert copies[0].read_bytes() == copies[1].read_bytes()
