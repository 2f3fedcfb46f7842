"""The Kubernetes manifests parse and wire together: GPU scheduling, shared model store, probes, metrics."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

K8S = Path(__file__).resolve().parent.parent / "deploy" / "k8s"
GPU_LABEL = "nvidia.com/gpu.product"


@pytest.fixture(scope="module")
def objects() -> dict[tuple[str, str], dict]:
    """Every object of every manifest, by (kind, name)."""
    found = {}
    for manifest in sorted(K8S.glob("*.yaml")):
        for document in yaml.safe_load_all(manifest.read_text()):
            key = (document["kind"], document["metadata"]["name"])
            assert key not in found, f"{key} defined twice"
            found[key] = document
    return found


def gpu_products(pod_spec: dict) -> list[str]:
    terms = pod_spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    (expression,) = [e for term in terms for e in term["matchExpressions"] if e["key"] == GPU_LABEL]
    assert expression["operator"] == "In"
    return expression["values"]


def claims(pod_spec: dict) -> dict[str, str]:
    """Volume name -> claimed PVC."""
    return {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod_spec["volumes"] if "persistentVolumeClaim" in v}


def test_manifests_declare_the_expected_objects(objects):
    assert set(objects) == {
        ("Deployment", "pcb-inspect"),
        ("Service", "pcb-inspect"),
        ("Job", "pcb-engine-build"),
        ("PersistentVolumeClaim", "pcb-model-store"),
        ("PersistentVolumeClaim", "deeppcb-dataset"),
    }


def test_model_store_is_shared_read_write_many(objects):
    for name in ("pcb-model-store", "deeppcb-dataset"):
        assert objects[("PersistentVolumeClaim", name)]["spec"]["accessModes"] == ["ReadWriteMany"]


def test_server_and_engine_build_run_on_the_same_gpu_product_with_one_gpu_each(objects):
    server = objects[("Deployment", "pcb-inspect")]["spec"]["template"]["spec"]
    build = objects[("Job", "pcb-engine-build")]["spec"]["template"]["spec"]
    assert gpu_products(server) == gpu_products(build) and gpu_products(server)
    for pod in (server, build):
        (container,) = pod["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert pod["securityContext"]["runAsNonRoot"] is True


def test_server_reads_the_model_store_the_job_writes(objects):
    server = objects[("Deployment", "pcb-inspect")]["spec"]["template"]["spec"]
    build = objects[("Job", "pcb-engine-build")]["spec"]["template"]["spec"]
    (triton,) = server["containers"]
    (builder,) = build["containers"]
    store_volume = next(name for name, claim in claims(server).items() if claim == "pcb-model-store")
    mount = next(m for m in triton["volumeMounts"] if m["name"] == store_volume)
    assert (mount["mountPath"], mount["subPath"], mount["readOnly"]) == ("/models", "models", True)
    assert "pcb-model-store" in claims(build).values() and "deeppcb-dataset" in claims(build).values()
    script = builder["args"][0]
    # Built and validated in staging; published to the path the server mounts only after validation passed.
    assert script.index("tools.engine.build") < script.index("tools.engine.validate") < script.index("/store/models\n")
    assert builder["command"] == ["/bin/bash", "-ceu"]  # -e: a failed build or validation publishes nothing


def test_probes_use_tritons_health_endpoints(objects):
    (triton,) = objects[("Deployment", "pcb-inspect")]["spec"]["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in triton["ports"]}
    assert ports == {"http": 8000, "grpc": 8001, "metrics": 8002}
    assert triton["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    assert triton["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert triton["startupProbe"]["httpGet"]["path"] == "/v2/health/ready"


def test_metrics_are_announced_for_prometheus_on_8002(objects):
    deployment = objects[("Deployment", "pcb-inspect")]
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == "8002"
    assert annotations["prometheus.io/path"] == "/metrics"


def test_service_exposes_http_grpc_and_metrics_of_the_server_pods(objects):
    service = objects[("Service", "pcb-inspect")]["spec"]
    pod_labels = objects[("Deployment", "pcb-inspect")]["spec"]["template"]["metadata"]["labels"]
    assert service["selector"].items() <= pod_labels.items()
    assert {(p["port"], p["targetPort"]) for p in service["ports"]} == {(8000, "http"), (8001, "grpc"), (8002, "metrics")}
