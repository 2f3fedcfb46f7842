"""Monitoring of the deployment: every PromQL expression parses, names the contract's models and the deployment's
namespace, the alerts the runbook promises exist, the HPA's metric is served by the prometheus-adapter rule,
and the Grafana dashboard shows the pipeline's pcb_* metrics beside Triton's latency, throughput and GPU use.
"""
from __future__ import annotations

import json

import promql_parser
import pytest
import yaml

from deploy.render import K8S, KUSTOMIZATIONS, build
from tools.contract import served_contract

ADAPTER_VALUES = K8S / "monitoring" / "prometheus-adapter-values.yaml"
DASHBOARD = K8S / "base" / "grafana-dashboard-pcb-inspect.json"
# From the operations issue (not exported yet): the dashboard has a panel for each.
PCB_METRICS = {"pcb_inspected_images_total", "pcb_defects_total", "pcb_rejected_images_total",
               "pcb_defects_per_image_bucket", "pcb_template_match_score_bucket"}
TRITON_PANEL_METRICS = {"nv_inference_request_summary_us", "nv_inference_count", "nv_inference_request_success",
                        "nv_gpu_utilization", "nv_gpu_memory_used_bytes"}
# What each alert is for (issue: not ready, stub restarts, p99 over target, reject rate, GPU memory).
ALERT_METRICS = {
    "PcbInspectPodNotReady": "kube_pod_status_ready",
    "PcbInspectNoReadyReplica": "kube_deployment_status_replicas_available",
    "PcbInspectTritonRestarted": "kube_pod_container_status_restarts_total",
    "PcbInspectP99LatencyHigh": "nv_inference_request_summary_us",
    "PcbInspectRejectRateHigh": "pcb_rejected_images_total",
    "PcbInspectInferenceErrors": "nv_inference_request_failure",
    "PcbInspectGpuMemoryHigh": "nv_gpu_memory_used_bytes",
    "PcbInspectAtMaxReplicas": "kube_horizontalpodautoscaler_spec_max_replicas",
}


@pytest.fixture(scope="module")
def base() -> list[dict]:
    return build(KUSTOMIZATIONS["base"])


@pytest.fixture(scope="module")
def rules(base) -> dict[str, dict]:
    (rule_object,) = [o for o in base if o["kind"] == "PrometheusRule"]
    return {rule.get("alert") or rule["record"]: rule for group in rule_object["spec"]["groups"]
            for rule in group["rules"]}


def selectors(expr: str) -> list[promql_parser.VectorSelector]:
    """The vector selectors of a PromQL expression (ValueError if it does not parse)."""
    found = []
    promql_parser.walk(promql_parser.parse(expr), lambda node: found.append(node) if isinstance(
        node, promql_parser.VectorSelector) else None)
    return found


def matchers(selector) -> dict[str, str]:
    return {m.name: m.value for m in selector.matchers.matchers}


def namespace(base) -> str:
    (ns,) = [o["metadata"]["name"] for o in base if o["kind"] == "Namespace"]
    return ns


def test_rules_parse_and_select_the_deployments_namespace(base, rules):
    assert set(ALERT_METRICS) <= set(rules)
    for name, rule in rules.items():
        found = selectors(rule["expr"])
        assert found, name
        for selector in found:
            assert matchers(selector).get("namespace") == namespace(base), (name, selector.name)
    for alert, metric in ALERT_METRICS.items():
        assert metric in {s.name for s in selectors(rules[alert]["expr"])}, alert
        assert rules[alert]["labels"]["severity"] in ("info", "warning", "critical")
        assert rules[alert]["annotations"]["summary"] and rules[alert]["annotations"]["description"]


def test_queue_time_rule_sums_the_pipeline_steps_per_pipeline_request(rules):
    contract = served_contract()
    (record,) = [r for r in rules.values() if "record" in r]
    models = {s.name: matchers(s)["model"] for s in selectors(record["expr"])}
    assert set(models["nv_inference_queue_duration_us"].split("|")) == {
        contract.preprocess_model, contract.detector_model, contract.postprocess_model}
    assert models["nv_inference_request_success"] == contract.pipeline_model
    # The p99 alert and the error alert watch the ensemble, as clients see it.
    for alert in ("PcbInspectP99LatencyHigh", "PcbInspectInferenceErrors"):
        assert {matchers(s)["model"] for s in selectors(rules[alert]["expr"])} == {contract.pipeline_model}


def test_the_hpa_metric_is_served_by_the_adapter_rule_from_the_recording_rule(rules):
    values = yaml.safe_load(ADAPTER_VALUES.read_text())
    (rule,) = values["rules"]["custom"]
    (record,) = [name for name, r in rules.items() if "record" in r]
    (series,) = selectors(rule["seriesQuery"])
    assert series.name == record
    assert rule["name"]["as"] == "pcb_queue_time_per_request_us"
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
    query = (rule["metricsQuery"].replace("<<.Series>>", record).replace("<<.LabelMatchers>>", 'pod=~"a|b"')
             .replace("<<.GroupBy>>", "pod"))
    assert {s.name for s in selectors(query)} == {record}
    for variant in ("gpu", "cpu"):
        (hpa,) = [o for o in build(KUSTOMIZATIONS[variant]) if o["kind"] == "HorizontalPodAutoscaler"]
        assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == rule["name"]["as"]


def dashboard_exprs(dashboard: dict) -> list[str]:
    return [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]


def test_dashboard_shows_pcb_and_triton_metrics_in_valid_promql(base):
    dashboard = json.loads(DASHBOARD.read_text())
    names = set()
    for expr in dashboard_exprs(dashboard):
        concrete = expr.replace("$__rate_interval", "5m").replace("$namespace", namespace(base))
        found = selectors(concrete)
        names |= {s.name for s in found}
        assert all(matchers(s).get("namespace") == namespace(base) for s in found), expr
    assert PCB_METRICS <= names and TRITON_PANEL_METRICS <= names
    assert len({panel["id"] for panel in dashboard["panels"]}) == len(dashboard["panels"])
    (config_map,) = [o for o in base if o["kind"] == "ConfigMap"]
    assert json.loads(config_map["data"]["pcb-inspect.json"]) == dashboard
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"


def test_service_monitor_and_rules_are_picked_up_by_the_same_prometheus(base):
    monitor, rule = ([o for o in base if o["kind"] == kind][0] for kind in ("ServiceMonitor", "PrometheusRule"))
    assert monitor["metadata"]["labels"]["release"] == rule["metadata"]["labels"]["release"]
