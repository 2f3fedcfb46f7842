"""docs/deploy.md matches the manifests: every folder, object, namespace, label, secret key, header and metric
its commands name exists in the rendered kustomizations, and the figures it quotes are the manifests' own."""
from __future__ import annotations

import re

import pytest

from deploy.render import K8S, KUSTOMIZATIONS, build, pod_specs
from tests.test_k8s_manifests import flag_values, triton, tritonserver_flags
from tools.contract import REPO_ROOT

RUNBOOK = REPO_ROOT / "docs" / "deploy.md"
# How the runbook names objects, as kubectl does: kind/name, or kind name after a verb.
KINDS = {"deployment": "Deployment", "job": "Job", "pod": "Pod", "service": "Service", "hpa": "HorizontalPodAutoscaler",
         "secret": "Secret", "configmap": "ConfigMap"}


@pytest.fixture(scope="module")
def text() -> str:
    return RUNBOOK.read_text()


@pytest.fixture(scope="module")
def commands(text) -> list[str]:
    """The shell commands of the runbook's code blocks and inline code, continuation lines joined."""
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    lines = "\n".join(blocks).replace("\\\n", " ").splitlines()
    inline = [code for code in re.findall(r"`([^`\n]+)`", text) if code.startswith(("kubectl", "python", "helm"))]
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")] + inline


@pytest.fixture(scope="module")
def objects() -> dict[tuple[str, str], dict]:
    return {(o["kind"], o["metadata"]["name"]): o for path in KUSTOMIZATIONS.values() for o in build(path)}


def namespace(objects) -> str:
    (name,) = [name for kind, name in objects if kind == "Namespace"]
    return name


def test_every_kustomization_and_path_named_exists(text, commands):
    for command in commands:
        for folder in re.findall(r"(?:apply -k|kustomize|deploy\.render) (\S+)", command):
            assert (REPO_ROOT / folder).resolve() in {p.resolve() for p in KUSTOMIZATIONS.values()}, command
    for path in set(re.findall(r"deploy/[\w./-]+", text)):
        path = path.rstrip(".")
        assert (REPO_ROOT / path).exists(), path
    # Every kustomization an operator applies is explained in the runbook.
    for folder in KUSTOMIZATIONS.values():
        assert f"`{folder.relative_to(REPO_ROOT)}`" in text, folder


def test_kubectl_commands_name_objects_of_the_namespace(commands, objects):
    checked = 0
    for command in (c for c in commands if c.startswith("kubectl") or "| kubectl" in c):
        for flag_namespace in re.findall(r"kubectl -n (\S+)", command):
            assert flag_namespace == namespace(objects), command
        for kind, name in re.findall(r"\b(deployment|job|pod|service|hpa)[/ ](pcb-[a-z0-9-]+)", command):
            assert (KINDS[kind], name) in objects, command
            checked += 1
        for name in re.findall(r"\bexec (?:-i )?(pcb-[a-z0-9-]+)", command):
            assert ("Pod", name) in objects, command
        for selector in re.findall(r"\s-l ([\w./-]+=[\w.-]+)", command):
            key, value = selector.split("=")
            assert any(o["spec"]["template"]["metadata"]["labels"].get(key) == value
                       for o in objects.values() if pod_specs(o) and o["kind"] != "Pod"), command
        for name in re.findall(r"/namespaces/([\w-]+)/", command):
            assert name == namespace(objects), command
    assert checked >= 10


def test_secret_key_and_headers_are_the_deployments(text, commands, objects):
    deployment = objects[("Deployment", "pcb-inspect")]
    (volume,) = [v for v in deployment["spec"]["template"]["spec"]["volumes"] if "secret" in v]
    secret = volume["secret"]["secretName"]
    created = [c for c in commands if "create secret generic" in c]
    assert created and all(f"create secret generic {secret} " in c for c in created)
    (key,) = {k for c in created for k in re.findall(r"--from-literal=([\w-]+)=", c)}
    assert f"/{key})" in triton(deployment)["args"][0]  # the wrapper reads the file named by the key
    for c in commands:
        for named in re.findall(r"(?:delete|get) secret (\S+)", c):
            assert named == secret, c
    (http,) = flag_values(tritonserver_flags(triton(deployment)), "http-restricted-api")
    header = http.split(":", 1)[1].split("=")[0]
    assert f"`{header}`" in text and f"`triton-grpc-protocol-{header}`" in text


def test_figures_quoted_are_the_manifests(text, objects):
    deployment = objects[("Deployment", "pcb-inspect")]
    flags = tritonserver_flags(triton(deployment))
    (age,) = flag_values(flags, "grpc-max-connection-age")
    assert f"closed after {int(age) // 60000} minutes" in text
    (pool,) = flag_values(flags, "cuda-memory-pool-byte-size")
    assert f"`{pool}`" in text
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    (exit_timeout,) = flag_values(flags, "exit-timeout-secs")
    assert f"`{exit_timeout}` (< `terminationGracePeriodSeconds` {grace}" in text
    for variant, target in (("pcb-inspect", "GPU"), ("pcb-inspect-cpu", "CPU")):
        hpa = objects[("HorizontalPodAutoscaler", variant)]
        metric = hpa["spec"]["metrics"][0]["pods"]
        assert metric["metric"]["name"] in text
        assert f"{int(metric['target']['averageValue']) // 1000} ms on {target}" in text
    placeholder = deployment["spec"]["template"]["spec"]["containers"][0]["env"][0]["value"]
    assert f"`{placeholder}`" in text
    # The flag table lists flags the Deployments really pass.
    passed = {flag.split("=")[0] for flag in flags} | {f.split("=")[0] for f in tritonserver_flags(
        triton(objects[("Deployment", "pcb-inspect-cpu")]))}
    for flag in re.findall(r"^\| `(--[a-z-]+)", text, re.M):
        assert flag in passed, flag
    assert (K8S / "monitoring" / "prometheus-adapter-values.yaml").read_text().count("pcb_queue_time_per_request_us") >= 1
