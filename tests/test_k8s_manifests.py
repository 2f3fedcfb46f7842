"""The Kubernetes deployment (deploy/k8s, docs/deploy.md), rendered: each variant's objects wire together and
keep the properties the deployment relies on. Facts of the model repository come from tools.contract.

Rendering is deploy.render (kustomize's semantics for what these kustomizations use; compared with real
kustomize in tests/test_deploy_render.py); schema and checkov checks are in tests/test_deploy_validate.py.
"""
from __future__ import annotations

import re
import shlex

import pytest
import yaml
from tritonclient.grpc import model_config_pb2

from deploy.render import K8S, KUSTOMIZATIONS, build, pod_specs
from tools.contract import CPU_CONFIG_NAME, load_repository, served_contract

NAMESPACE = "pcb-inspection"
GPU_LABEL = "nvidia.com/gpu.product"
SHARED_SUFFIX = "-SHARED"  # GPU Feature Discovery's product label under time-slicing
MIB = 1 << 20
DTYPE_BYTES = {model_config_pb2.TYPE_FP32: 4, model_config_pb2.TYPE_FP16: 2, model_config_pb2.TYPE_UINT8: 1}
# What the issue wants behind the admin key, and what must stay open for probes and clients.
RESTRICTED = {"model-repository", "shared-memory", "statistics", "trace", "logging"}
OPEN = {"health", "metadata", "inference"}
PSS_VOLUME_TYPES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                    "projected", "secret"}


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    """Every kustomization an operator applies, rendered: name -> objects."""
    return {name: build(path) for name, path in KUSTOMIZATIONS.items()}


def find(objects: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def one(objects: list[dict], kind: str, name: str | None = None) -> dict:
    (found,) = find(objects, kind, name)
    return found


def server(objects: list[dict]) -> dict:
    """The variant's Triton Deployment."""
    return one(objects, "Deployment")


def triton(deployment: dict) -> dict:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["name"] == "triton"
    return container


def tritonserver_flags(container: dict) -> list[str]:
    """The flags tritonserver gets: the args after the wrapper script and its $0, plus the wrapper's own."""
    script, argv0, *flags = container["args"]
    assert container["command"] == ["/bin/bash", "-c"] and argv0 == "tritonserver"
    assert 'exec tritonserver "$@"' in script
    exec_line = script[script.index("exec tritonserver"):].replace("\\\n", " ")
    return flags + [word for word in shlex.split(exec_line)[2:] if word.startswith("--")]


def flag_values(flags: list[str], name: str) -> list[str]:
    return [flag.split("=", 1)[1] for flag in flags if flag.startswith(f"--{name}=")]


def selects(selector: dict, labels: dict) -> bool:
    match = selector.get("matchLabels", selector if "matchExpressions" not in selector else {})
    return bool(match) and match.items() <= labels.items()


def gpu_products(pod_spec: dict) -> list[str]:
    terms = pod_spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    (expression,) = [e for term in terms for e in term["matchExpressions"] if e["key"] == GPU_LABEL]
    assert expression["operator"] == "In"
    return expression["values"]


def largest_tensor_bytes() -> int:
    """Preprocess's output to the detector at max_batch_size: the largest tensor of the pipeline."""
    contract = served_contract()
    output = next(o for o in load_repository()[contract.preprocess_model].output if o.name == contract.detector_input)
    return (contract.max_batch_size * contract.channels * contract.input_height * contract.input_width
            * DTYPE_BYTES[output.data_type])


def instance_count(config) -> int:
    return sum(group.count for group in config.instance_group)


# ---- layout ----------------------------------------------------------------------------------------------

def test_each_kustomization_renders_the_expected_objects(rendered):
    names = {name: sorted(f"{o['kind']}/{o['metadata']['name']}" for o in objects) for name, objects in rendered.items()}
    shared = ["ConfigMap/pcb-inspect-grafana-dashboard", "Namespace/pcb-inspection", "NetworkPolicy/pcb-default-deny",
              "NetworkPolicy/pcb-inspect-server", "PersistentVolumeClaim/deeppcb-dataset",
              "PersistentVolumeClaim/pcb-model-store", "PrometheusRule/pcb-inspect", "ServiceAccount/pcb-inspect",
              "ServiceMonitor/pcb-inspect"]
    assert names["base"] == shared
    for variant, suffix in (("gpu", ""), ("cpu", "-cpu")):
        server_objects = [f"Deployment/pcb-inspect{suffix}", f"HorizontalPodAutoscaler/pcb-inspect{suffix}",
                          f"PodDisruptionBudget/pcb-inspect{suffix}", f"Service/pcb-inspect{suffix}",
                          f"Service/pcb-inspect-grpc{suffix}"]
        assert names[variant] == sorted(shared + server_objects)
    for job, suffix in (("engine-build", ""), ("release-cpu-only", "-cpu-only")):
        assert names[job] == sorted([f"ConfigMap/pcb-publish-release{suffix}", f"Job/pcb-engine-build{suffix}",
                                     f"NetworkPolicy/pcb-engine-build{suffix}", f"ServiceAccount/pcb-engine-build{suffix}"])
    assert names["store-shell"] == ["Pod/pcb-store-shell"]


def test_everything_lives_in_one_namespace_with_pod_security_restricted(rendered):
    namespace = one(rendered["base"], "Namespace")
    assert namespace["metadata"]["name"] == NAMESPACE
    labels = namespace["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    for objects in rendered.values():
        for o in objects:
            assert o["kind"] == "Namespace" or o["metadata"]["namespace"] == NAMESPACE, o["metadata"]["name"]


def test_the_variants_share_one_model_store_and_differ_where_they_must(rendered):
    gpu, cpu = server(rendered["gpu"]), server(rendered["cpu"])
    for deployment in (gpu, cpu):
        claims = [v["persistentVolumeClaim"]["claimName"] for v in deployment["spec"]["template"]["spec"]["volumes"]
                  if "persistentVolumeClaim" in v]
        assert claims == ["pcb-model-store"]
    gpu_flags, cpu_flags = tritonserver_flags(triton(gpu)), tritonserver_flags(triton(cpu))
    assert flag_values(cpu_flags, "model-config-name") == [CPU_CONFIG_NAME]
    assert flag_values(gpu_flags, "model-config-name") == []  # the default configs are the GPU ones
    assert set(cpu_flags) - set(gpu_flags) == {f"--model-config-name={CPU_CONFIG_NAME}"}
    assert [f.split("=")[0] for f in set(gpu_flags) - set(cpu_flags)] == ["--cuda-memory-pool-byte-size"]
    # The two variants' selectors are disjoint: neither Deployment, Service nor PDB reaches the other's pods.
    for this, other in ((rendered["gpu"], cpu), (rendered["cpu"], gpu)):
        other_labels = other["spec"]["template"]["metadata"]["labels"]
        assert not selects(server(this)["spec"]["selector"], other_labels)
        assert not any(selects(s["spec"]["selector"], other_labels) for s in find(this, "Service"))
        assert not selects(one(this, "PodDisruptionBudget")["spec"]["selector"], other_labels)


# ---- Pod Security "restricted", hardening --------------------------------------------------------------

def all_pod_specs(rendered) -> list[tuple[str, dict]]:
    return [(f"{name}:{o['kind']}/{o['metadata']['name']}", spec)
            for name, objects in rendered.items() for o in objects for spec in pod_specs(o)]


def test_every_pod_meets_pod_security_restricted(rendered):
    pods = all_pod_specs(rendered)
    assert len(pods) == 5  # two Deployments, two Jobs, the store shell
    for where, pod in pods:
        context = pod["securityContext"]
        assert context["runAsNonRoot"] is True and context["runAsUser"] != 0, where
        assert context["seccompProfile"]["type"] in ("RuntimeDefault", "Localhost"), where
        assert pod["automountServiceAccountToken"] is False and pod["serviceAccountName"] != "default", where
        assert not any(pod.get(key) for key in ("hostNetwork", "hostPID", "hostIPC")), where
        for volume in pod.get("volumes", []):
            assert set(volume) - {"name"} <= PSS_VOLUME_TYPES, (where, volume)
        for container in pod["containers"] + pod.get("initContainers", []):
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False and not security.get("privileged"), where
            assert security["capabilities"]["drop"] == ["ALL"] and not security["capabilities"].get("add"), where
            assert security["readOnlyRootFilesystem"] is True, where
            assert not any("hostPort" in port for port in container.get("ports", [])), where
            resources = container["resources"]
            assert {"cpu", "memory"} <= set(resources["requests"]) and {"cpu", "memory"} <= set(resources["limits"])
            # Secrets as files, never environment variables.
            assert not any("secretKeyRef" in env.get("valueFrom", {}) for env in container.get("env", [])), where


def test_every_pod_is_covered_by_a_network_policy_and_the_server_only_opens_its_ports(rendered):
    policies = [p for objects in rendered.values() for p in find(objects, "NetworkPolicy")]
    deny = one(rendered["base"], "NetworkPolicy", "pcb-default-deny")["spec"]
    assert deny["podSelector"] == {} and deny["policyTypes"] == ["Ingress", "Egress"] and "ingress" not in deny
    for name, objects in rendered.items():
        for o in objects:
            for _ in pod_specs(o):
                labels = o["metadata"]["labels"] if o["kind"] == "Pod" else o["spec"]["template"]["metadata"]["labels"]
                # An empty podSelector (the default deny) selects every pod of the namespace.
                assert any(p["spec"]["podSelector"] == {} or selects(p["spec"]["podSelector"], labels)
                           for p in policies), (name, o["metadata"]["name"])
    allow = one(rendered["base"], "NetworkPolicy", "pcb-inspect-server")["spec"]
    for variant in ("gpu", "cpu"):
        assert selects(allow["podSelector"], server(rendered[variant])["spec"]["template"]["metadata"]["labels"])
    opened = {port["port"] for rule in allow["ingress"] for port in rule["ports"]}
    assert opened == {"http", "grpc", "metrics"}
    (metrics_rule,) = [rule for rule in allow["ingress"] if {p["port"] for p in rule["ports"]} == {"metrics"}]
    assert metrics_rule["from"], "metrics must only be open to the monitoring namespace"
    assert allow["policyTypes"] == ["Ingress"]  # egress stays denied


def test_triton_apis_that_change_or_reveal_the_server_need_the_admin_key_from_a_secret(rendered):
    for variant in ("gpu", "cpu"):
        deployment = server(rendered[variant])
        container = triton(deployment)
        flags = tritonserver_flags(container)
        for name in ("http-restricted-api", "grpc-restricted-protocol"):
            (value,) = flag_values(flags, name)
            groups, _, key = value.partition(":")
            header, _, secret = key.partition("=")
            assert set(groups.split(",")) == RESTRICTED and not set(groups.split(",")) & OPEN
            assert header == "pcb-admin-key" and secret == "${key}"
        # The key is read from the mounted Secret's file.
        script = container["args"][0]
        (path,) = re.findall(r'key="\$\(cat (\S+)\)"', script)
        mount = next(m for m in container["volumeMounts"] if path.startswith(m["mountPath"] + "/"))
        volume = next(v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"])
        assert volume["secret"]["secretName"] == "pcb-inspect-admin-key"
        assert path == f"{mount['mountPath']}/admin-key" and mount["readOnly"] is True


# ---- health, shutdown, rollout, availability ------------------------------------------------------------

def test_probes_are_readiness_and_the_canary_check_for_liveness(rendered):
    for variant in ("gpu", "cpu"):
        container = triton(server(rendered[variant]))
        assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"http": 8000, "grpc": 8001,
                                                                                "metrics": 8002}
        for probe in ("startupProbe", "readinessProbe"):
            assert container[probe]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}, probe
        liveness, readiness = container["livenessProbe"], container["readinessProbe"]
        # Liveness is the canary (a known board through the pipeline): readiness stays 200 with a dead stub.
        shell, flag, script = liveness["exec"]["command"]
        assert (shell, flag) == ("/bin/sh", "-c")
        words = shlex.split(script)
        assert words[:4] == ["exec", "python3", "-m", "tools.healthcheck"]
        options = dict(zip(words[4::2], words[5::2]))
        assert options["--url"] == "localhost:8001" and options["--metrics-url"] == "http://localhost:8002/metrics"
        assert options["--model-repository"] == "/models/releases/${PCB_MODEL_RELEASE}/models"
        assert int(options["--deadline-ms"]) < 1000 * liveness["timeoutSeconds"]
        # Liveness gives up much later than readiness: a pod is taken out of the Service first.
        assert liveness["failureThreshold"] * liveness["periodSeconds"] >= 60
        assert liveness["failureThreshold"] * liveness["periodSeconds"] > 4 * readiness["failureThreshold"] * readiness["periodSeconds"]


def test_the_serving_image_carries_the_canary_check():
    dockerfile = (K8S.parent.parent / "Dockerfile").read_text()
    serving = dockerfile[dockerfile.index("AS serving"):]
    assert "WORKDIR /opt/pcb-inspect" in serving and "COPY tools/ /opt/pcb-inspect/tools/" in serving
    pins = (K8S.parent.parent / "docker" / "requirements-serving.txt").read_text()
    assert "tritonclient[grpc]==" in pins  # tools.contract and the canary's gRPC client


def test_grace_period_covers_the_prestop_drain_and_tritons_exit_timeout(rendered):
    for variant in ("gpu", "cpu"):
        deployment = server(rendered[variant])
        container = triton(deployment)
        (exit_timeout,) = flag_values(tritonserver_flags(container), "exit-timeout-secs")
        (sleep,) = re.findall(r"sleep (\d+)", " ".join(container["lifecycle"]["preStop"]["exec"]["command"]))
        grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert grace > int(sleep) + int(exit_timeout)


def test_rollout_needs_no_spare_gpu_and_disruptions_keep_one_pod_serving(rendered):
    for variant in ("gpu", "cpu"):
        objects = rendered[variant]
        deployment, hpa, pdb = server(objects), one(objects, "HorizontalPodAutoscaler"), one(objects, "PodDisruptionBudget")
        strategy = deployment["spec"]["strategy"]
        assert strategy["type"] == "RollingUpdate" and strategy["rollingUpdate"]["maxSurge"] == 0
        assert "replicas" not in deployment["spec"]  # the HPA owns it
        assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                                 "name": deployment["metadata"]["name"]}
        pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert selects(pdb["spec"]["selector"], pod_labels)
        assert hpa["spec"]["minReplicas"] > pdb["spec"]["maxUnavailable"]
        assert hpa["spec"]["minReplicas"] > strategy["rollingUpdate"]["maxUnavailable"]
        spread = deployment["spec"]["template"]["spec"]["topologySpreadConstraints"]
        assert {c["topologyKey"] for c in spread} == {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}
        assert all(selects(c["labelSelector"], pod_labels) for c in spread)


def test_hpa_scales_on_queue_time_above_the_batchers_own_delay(rendered):
    contract, configs = served_contract(), load_repository()
    steps = (contract.preprocess_model, contract.detector_model, contract.postprocess_model)
    designed_delay_us = sum(configs[step].dynamic_batching.max_queue_delay_microseconds for step in steps)
    for variant in ("gpu", "cpu"):
        (metric,) = one(rendered[variant], "HorizontalPodAutoscaler")["spec"]["metrics"]
        assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == "pcb_queue_time_per_request_us"
        assert int(metric["pods"]["target"]["averageValue"]) >= 4 * designed_delay_us


# ---- balancing, metrics ---------------------------------------------------------------------------------

def test_grpc_is_balanced_by_a_headless_service_and_a_bounded_connection_age(rendered):
    for variant in ("gpu", "cpu"):
        objects = rendered[variant]
        pod_labels = server(objects)["spec"]["template"]["metadata"]["labels"]
        headless = [s for s in find(objects, "Service") if s["spec"].get("clusterIP") == "None"]
        (service,) = headless
        assert selects(service["spec"]["selector"], pod_labels)
        assert [p["targetPort"] for p in service["spec"]["ports"]] == ["grpc"]
        flags = tritonserver_flags(triton(server(objects)))
        (age,) = flag_values(flags, "grpc-max-connection-age")
        (grace,) = flag_values(flags, "grpc-max-connection-age-grace")
        assert 0 < int(grace) < int(age) <= 10 * 60 * 1000  # milliseconds


def test_metrics_are_scraped_once_by_the_service_monitor_with_latency_percentiles(rendered):
    monitor = one(rendered["base"], "ServiceMonitor")
    (endpoint,) = monitor["spec"]["endpoints"]
    for variant in ("gpu", "cpu"):
        objects = rendered[variant]
        deployment = server(objects)
        pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
        scraped = [s for s in find(objects, "Service") if selects(monitor["spec"]["selector"], s["metadata"]["labels"])
                   and selects(s["spec"]["selector"], pod_labels)
                   and endpoint["port"] in {p["name"] for p in s["spec"]["ports"]}]
        assert len(scraped) == 1, "each pod must be scraped through exactly one Service"
        assert "summary_latencies=true" in flag_values(tritonserver_flags(triton(deployment)), "metrics-config")
    for objects in rendered.values():
        for o in objects:
            for metadata in [o["metadata"]] + [o["spec"]["template"]["metadata"] for _ in pod_specs(o) if o["kind"] != "Pod"]:
                assert not any(k.startswith("prometheus.io/") for k in metadata.get("annotations", {})), o["metadata"]["name"]


# ---- GPU --------------------------------------------------------------------------------------------------

def test_server_and_engine_build_run_on_the_same_gpu_products_time_slicing_included(rendered):
    gpu_server = server(rendered["gpu"])["spec"]["template"]["spec"]
    build_pod = one(rendered["engine-build"], "Job")["spec"]["template"]["spec"]
    products = gpu_products(gpu_server)
    assert products == gpu_products(build_pod) and products
    bases = [p for p in products if not p.endswith(SHARED_SUFFIX)]
    assert sorted(products) == sorted(bases + [p + SHARED_SUFFIX for p in bases])
    for pod in (gpu_server, build_pod):
        (container,) = pod["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    for pod in (server(rendered["cpu"])["spec"]["template"]["spec"],
                one(rendered["release-cpu-only"], "Job")["spec"]["template"]["spec"]):
        (container,) = pod["containers"]
        assert "affinity" not in pod and "nvidia.com/gpu" not in container["resources"]["limits"]


def test_cuda_memory_pool_holds_the_largest_tensors_in_flight(rendered):
    """Pool >= 2 x (preprocess + detector GPU instances) x the largest tensor (preprocess's batch output)."""
    contract, configs = served_contract(), load_repository()
    largest = largest_tensor_bytes()
    in_flight = instance_count(configs[contract.preprocess_model]) + instance_count(configs[contract.detector_model])
    (pool,) = flag_values(tritonserver_flags(triton(server(rendered["gpu"]))), "cuda-memory-pool-byte-size")
    device, _, size = pool.partition(":")
    assert device == "0" and int(size) % MIB == 0
    assert int(size) >= 2 * in_flight * largest
    assert int(size) < 2 * 2 * in_flight * largest  # sized, not just large
    derivation = (K8S / "overlays" / "gpu" / "gpu.yaml").read_text()
    assert f"{largest:,}" in derivation and f"{2 * in_flight * largest:,}" in derivation
    # /dev/shm carries the same tensors to the Python-backend stubs (on the CPU variant, all of them).
    for variant in ("gpu", "cpu"):
        volumes = server(rendered[variant])["spec"]["template"]["spec"]["volumes"]
        (shm,) = [v for v in volumes if v["name"] == "dshm"]
        assert shm["emptyDir"]["medium"] == "Memory"
        assert parse_quantity(shm["emptyDir"]["sizeLimit"]) >= 2 * in_flight * largest


def parse_quantity(quantity: str) -> int:
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30}
    for suffix, factor in units.items():
        if quantity.endswith(suffix):
            return int(quantity[: -len(suffix)]) * factor
    return int(quantity)


# ---- model releases ---------------------------------------------------------------------------------------

def test_each_variant_serves_the_release_its_overlay_names_read_only(rendered):
    for variant in ("gpu", "cpu"):
        deployment = server(rendered[variant])
        container = triton(deployment)
        assert container["env"][0]["name"] == "PCB_MODEL_RELEASE"
        overlay = yaml.safe_load((KUSTOMIZATIONS[variant] / "release.yaml").read_text())
        assert overlay[-1] == {"op": "replace", "path": "/spec/template/spec/containers/0/env/0/value",
                               "value": container["env"][0]["value"]}
        (repository,) = flag_values(tritonserver_flags(container), "model-repository")
        assert repository == "/models/releases/$(PCB_MODEL_RELEASE)/models"
        (mount,) = [m for m in container["volumeMounts"] if m["name"] == "model-store"]
        assert mount == {"name": "model-store", "mountPath": "/models", "readOnly": True}  # no subPath
        assert '${release}/RELEASE.json' in container["args"][0]  # refuses to start on a missing release


def test_engine_build_job_publishes_into_the_folder_the_servers_read(rendered):
    source = (K8S / "engine-build" / "publish_release.py").read_text()
    for name, gpu in (("engine-build", True), ("release-cpu-only", False)):
        job = one(rendered[name], "Job")
        pod = job["spec"]["template"]["spec"]
        (builder,) = pod["containers"]
        config_map = one(rendered[name], "ConfigMap")
        assert config_map["data"] == {"publish_release.py": source}
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m for m in builder["volumeMounts"]}
        assert volumes[mounts["/store"]["name"]]["persistentVolumeClaim"] == {"claimName": "pcb-model-store"}
        assert not mounts["/store"].get("readOnly")
        assert volumes[mounts["/opt/pcb-release"]["name"]]["configMap"]["name"] == config_map["metadata"]["name"]
        assert builder["command"] == ["python3", "/opt/pcb-release/publish_release.py"]
        assert "--store=/store" in builder["args"] and ("--cpu-only" in builder["args"]) is not gpu
        assert job["spec"]["backoffLimit"] == 0
