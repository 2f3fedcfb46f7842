"""The rendered manifests against the Kubernetes API schemas (kubernetes-validate, strict) and checkov.

Both validators are pinned in requirements/deploy-tools.txt. checkov must report no failed check; a check may
be skipped only by a `checkov.io/skip<N>: <check>=<reason>` annotation written on the object itself.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest

from deploy.render import KUSTOMIZATIONS, build, to_yaml

# The oldest Kubernetes these manifests support, and the newest the pinned kubernetes-validate knows.
KUBERNETES_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
# prometheus-operator's kinds: no schema ships with kubernetes-validate; tests/test_deploy_monitoring.py
# checks their content.
CUSTOM_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("monitoring.coreos.com/v1", "PrometheusRule")}
SKIP_ANNOTATION = "checkov.io/skip"


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {name: build(path) for name, path in KUSTOMIZATIONS.items()}


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_object_is_valid_for_kubernetes_strictly(rendered, version):
    unchecked = set()
    for name, objects in rendered.items():
        for o in objects:
            try:
                kubernetes_validate.validate(o, version, strict=True)
            except kubernetes_validate.SchemaNotFoundError:
                unchecked.add((o["apiVersion"], o["kind"]))
            except kubernetes_validate.ValidationError as error:
                pytest.fail(f"{name}: {o['kind']}/{o['metadata']['name']} at {list(error.path)}: {error.message}")
    assert unchecked <= CUSTOM_KINDS


def checkov_binary() -> str:
    found = shutil.which("checkov", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))
    assert found, "checkov not found: pip install -r requirements/test.txt (requirements/deploy-tools.txt)"
    return found


@pytest.fixture(scope="module")
def checkov_report(rendered, tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("rendered")
    for name, objects in rendered.items():
        (folder / f"{name}.yaml").write_text(to_yaml(objects))
    # --skip-download: no network (no Prisma Cloud guidelines or custom policies), the built-in checks only.
    result = subprocess.run([checkov_binary(), "--directory", str(folder), "--framework", "kubernetes",
                             "--skip-download", "--compact", "--output", "json"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode in (0, 1), result.stderr
    report = json.loads(result.stdout)
    (report,) = report if isinstance(report, list) else [report]
    assert report["check_type"] == "kubernetes"
    return report


def test_checkov_reports_no_failed_check(checkov_report):
    summary = checkov_report["summary"]
    failed = [f"{c['check_id']} {c['check_name']} ({c['resource']} in {c['file_path']})"
              for c in checkov_report["results"]["failed_checks"]]
    assert summary["failed"] == 0 and not failed, "\n".join(failed)
    assert summary["parsing_errors"] == 0
    passed = {c["check_id"] for c in checkov_report["results"]["passed_checks"]}
    # It really ran: seccomp, capabilities, read-only root, token mount, namespace, network policy, ...
    assert {"CKV_K8S_31", "CKV_K8S_37", "CKV_K8S_22", "CKV_K8S_38", "CKV_K8S_21", "CKV2_K8S_6",
            "CKV_K8S_20", "CKV_K8S_40", "CKV_K8S_35"} <= passed


def test_each_skipped_check_is_justified_on_its_object(rendered, checkov_report):
    justified = {}
    for name, objects in rendered.items():
        for o in objects:
            for key, value in o["metadata"].get("annotations", {}).items():
                if key.startswith(SKIP_ANNOTATION):
                    check, _, reason = value.partition("=")
                    assert len(reason.split()) >= 8, f"{o['metadata']['name']}: {check} needs its reason: {value!r}"
                    justified.setdefault((name, o["kind"], o["metadata"]["name"]), set()).add(check)
    for skipped in checkov_report["results"]["skipped_checks"]:
        kind, _, name = skipped["resource"].split(".", 2)
        kustomization = Path(skipped["file_path"]).stem
        assert skipped["check_id"] in justified.get((kustomization, kind, name), set()), skipped["resource"]
    assert checkov_report["summary"]["skipped"] == sum(len(checks) for checks in justified.values())
