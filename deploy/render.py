"""Render a kustomization of deploy/k8s/ without kustomize: the subset of kustomize these manifests use.

    python -m deploy.render deploy/k8s/overlays/gpu            # the YAML `kubectl kustomize` would print
    python -m deploy.render deploy/k8s/overlays/gpu | kubectl apply -f -

kustomize is what operators use (`kubectl apply -k`); this renderer exists so the tests can render and
validate the overlays on a machine without kubectl (no kustomize ships on PyPI for this Python). Where
`kubectl` or `kustomize` is installed, tests/test_deploy_render.py checks that both render the same objects.

Supported, with kustomize's semantics: ``resources`` (files and directories), ``namespace``, ``nameSuffix``
(every object but Namespace, and the references to the renamed objects inside the same build),
``patches`` given as JSON 6902 files (``path`` + ``target``), ``images`` and ``configMapGenerator`` with
``files`` and ``disableNameSuffixHash``. Anything else in a kustomization is an error, never ignored.
Transformers run in kustomize's order: patches, namespace, suffix, images.
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

import yaml

K8S = Path(__file__).resolve().parent / "k8s"
# Every kustomization an operator applies (docs/deploy.md), by the name the tests and the runbook use.
KUSTOMIZATIONS = {
    "base": K8S / "base",
    "gpu": K8S / "overlays" / "gpu",
    "cpu": K8S / "overlays" / "cpu",
    "engine-build": K8S / "engine-build",
    "release-cpu-only": K8S / "release-cpu-only",
    "store-shell": K8S / "store-shell",
}
KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
SUPPORTED_FIELDS = {"apiVersion", "kind", "resources", "namespace", "nameSuffix", "patches", "images",
                    "configMapGenerator"}
# Kinds without a namespace, among those these manifests use or may grow to use.
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "StorageClass",
                  "PersistentVolume", "PriorityClass", "APIService"}
# kustomize's "legacy" output order: these kinds first, in this order, then the rest by kind; then by name.
LEGACY_ORDER = ["Namespace", "ResourceQuota", "StorageClass", "CustomResourceDefinition", "ServiceAccount",
                "PodSecurityPolicy", "Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding", "ConfigMap",
                "Secret", "Endpoints", "Service", "LimitRange", "PriorityClass", "PersistentVolume",
                "PersistentVolumeClaim", "Deployment", "StatefulSet", "CronJob", "PodDisruptionBudget"]
LEGACY_LAST = ["MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"]
POD_TEMPLATE_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}


class RenderError(ValueError):
    """The kustomization uses something this renderer does not do, or a patch does not apply."""


def kustomization_file(directory: Path) -> Path:
    for name in KUSTOMIZATION_FILES:
        if (directory / name).is_file():
            return directory / name
    raise RenderError(f"{directory}: no kustomization.yaml")


# ---- JSON 6902 -------------------------------------------------------------------------------------------

def _pointer(path: str) -> list[str]:
    if not path.startswith("/"):
        raise RenderError(f"JSON pointer {path!r} must start with /")
    return [part.replace("~1", "/").replace("~0", "~") for part in path[1:].split("/")]


def _parent(document: Any, parts: list[str], path: str) -> tuple[Any, str]:
    node = document
    for part in parts[:-1]:
        try:
            node = node[int(part)] if isinstance(node, list) else node[part]
        except (KeyError, IndexError, ValueError) as error:
            raise RenderError(f"patch path {path!r} does not exist ({part!r})") from error
    return node, parts[-1]


def _get(document: Any, path: str) -> Any:
    node, last = _parent(document, _pointer(path), path)
    try:
        return node[int(last)] if isinstance(node, list) else node[last]
    except (KeyError, IndexError, ValueError) as error:
        raise RenderError(f"patch path {path!r} does not exist") from error


def apply_json6902(document: dict, operations: list[dict]) -> dict:
    """RFC 6902 (add, remove, replace, move, copy, test) on a copy of ``document``."""
    document = copy.deepcopy(document)
    for operation in operations:
        op, path = operation["op"], operation["path"]
        if op == "test":
            if _get(document, path) != operation["value"]:
                raise RenderError(f"patch test failed at {path}: {_get(document, path)!r} != {operation['value']!r}")
            continue
        if op in ("move", "copy"):
            value = copy.deepcopy(_get(document, operation["from"]))
            if op == "move":
                apply_json6902_in_place(document, {"op": "remove", "path": operation["from"]})
            apply_json6902_in_place(document, {"op": "add", "path": path, "value": value})
            continue
        apply_json6902_in_place(document, operation)
    return document


def apply_json6902_in_place(document: dict, operation: dict) -> None:
    op, path = operation["op"], operation["path"]
    node, last = _parent(document, _pointer(path), path)
    value = copy.deepcopy(operation.get("value"))
    if isinstance(node, list):
        if op == "add":
            node.insert(len(node) if last == "-" else int(last), value)
            return
        index = int(last)
        if not 0 <= index < len(node):
            raise RenderError(f"patch path {path!r}: index out of range")
        if op == "remove":
            del node[index]
        elif op == "replace":
            node[index] = value
        else:
            raise RenderError(f"unsupported patch op {op!r}")
        return
    if op == "add":
        node[last] = value
    elif op in ("remove", "replace"):
        if last not in node:
            raise RenderError(f"patch path {path!r} does not exist")
        if op == "remove":
            del node[last]
        else:
            node[last] = value
    else:
        raise RenderError(f"unsupported patch op {op!r}")


# ---- transformers ----------------------------------------------------------------------------------------

def _matches(resource: dict, target: dict) -> bool:
    unsupported = set(target) - {"group", "version", "kind", "name", "namespace"}
    if unsupported:
        raise RenderError(f"patch target fields {sorted(unsupported)} are not supported")
    group, _, version = resource["apiVersion"].rpartition("/")
    checks = {"group": group, "version": version, "kind": resource["kind"], "name": resource["metadata"]["name"],
              "namespace": resource["metadata"].get("namespace")}
    return all(checks[key] == value for key, value in target.items())


def pod_specs(resource: dict) -> list[dict]:
    if resource["kind"] == "Pod":
        return [resource["spec"]]
    if resource["kind"] in POD_TEMPLATE_KINDS:
        return [resource["spec"]["template"]["spec"]]
    if resource["kind"] == "CronJob":
        return [resource["spec"]["jobTemplate"]["spec"]["template"]["spec"]]
    return []


def containers(pod_spec: dict) -> list[dict]:
    return pod_spec.get("initContainers", []) + pod_spec.get("containers", [])


def set_images(resources: list[dict], images: list[dict]) -> None:
    """kustomize's ``images``: a container image named ``name`` gets newName / newTag / digest."""
    for image in images:
        unsupported = set(image) - {"name", "newName", "newTag", "digest"}
        if unsupported:
            raise RenderError(f"images fields {sorted(unsupported)} are not supported")
        for resource in resources:
            for pod_spec in pod_specs(resource):
                for container in containers(pod_spec):
                    name, tag, digest = split_image(container["image"])
                    if name != image["name"]:
                        continue
                    name = image.get("newName", name)
                    if "digest" in image:
                        container["image"] = f"{name}@{image['digest']}"
                    else:
                        tag = image.get("newTag", tag)
                        container["image"] = name + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")


def split_image(image: str) -> tuple[str, str | None, str | None]:
    """(name, tag, digest) of an image reference; a registry port is not a tag."""
    image, _, digest = image.partition("@")
    slash = image.rfind("/")
    colon = image.rfind(":")
    if colon > slash:
        return image[:colon], image[colon + 1:], digest or None
    return image, None, digest or None


def set_namespace(resources: list[dict], namespace: str) -> None:
    for resource in resources:
        if resource["kind"] not in CLUSTER_SCOPED:
            resource["metadata"]["namespace"] = namespace


def add_name_suffix(resources: list[dict], suffix: str) -> None:
    """Append ``suffix`` to every name but a Namespace's, and fix the references inside this build to them."""
    renamed: dict[tuple[str, str], str] = {}
    for resource in resources:
        if resource["kind"] == "Namespace":
            continue
        old = resource["metadata"]["name"]
        resource["metadata"]["name"] = old + suffix
        renamed[(resource["kind"], old)] = old + suffix
    for resource in resources:
        fix_references(resource, renamed)


def fix_references(resource: dict, renamed: dict[tuple[str, str], str]) -> None:
    """kustomize's name references, for the reference fields these manifests can contain."""
    def new(kind: str, name: str) -> str:
        return renamed.get((kind, name), name)

    if resource["kind"] == "HorizontalPodAutoscaler":
        ref = resource["spec"]["scaleTargetRef"]
        ref["name"] = new(ref["kind"], ref["name"])
    for pod_spec in pod_specs(resource):
        if "serviceAccountName" in pod_spec:
            pod_spec["serviceAccountName"] = new("ServiceAccount", pod_spec["serviceAccountName"])
        for volume in pod_spec.get("volumes", []):
            if "configMap" in volume:
                volume["configMap"]["name"] = new("ConfigMap", volume["configMap"]["name"])
            if "secret" in volume:
                volume["secret"]["secretName"] = new("Secret", volume["secret"]["secretName"])
            if "persistentVolumeClaim" in volume:
                claim = volume["persistentVolumeClaim"]
                claim["claimName"] = new("PersistentVolumeClaim", claim["claimName"])
        for container in containers(pod_spec):
            for env in container.get("env", []):
                source = env.get("valueFrom", {})
                for key, kind in (("configMapKeyRef", "ConfigMap"), ("secretKeyRef", "Secret")):
                    if key in source:
                        source[key]["name"] = new(kind, source[key]["name"])
            for env_from in container.get("envFrom", []):
                for key, kind in (("configMapRef", "ConfigMap"), ("secretRef", "Secret")):
                    if key in env_from:
                        env_from[key]["name"] = new(kind, env_from[key]["name"])


def generate_config_maps(directory: Path, generators: list[dict]) -> list[dict]:
    generated = []
    for generator in generators:
        unsupported = set(generator) - {"name", "files", "options"}
        options = generator.get("options", {})
        if unsupported or set(options) - {"disableNameSuffixHash", "labels", "annotations"}:
            raise RenderError(f"configMapGenerator {generator['name']}: only files and options are supported")
        if options.get("disableNameSuffixHash") is not True:
            raise RenderError(f"configMapGenerator {generator['name']}: set options.disableNameSuffixHash: true "
                              "(this renderer does not compute kustomize's content hash)")
        data = {}
        for entry in generator["files"]:
            key, _, path = entry.rpartition("=")
            path = (directory / path).resolve()
            if directory.resolve() not in path.parents:
                raise RenderError(f"{entry}: kustomize loads files only from inside the kustomization's folder")
            data[key or path.name] = path.read_text()
        metadata: dict[str, Any] = {"name": generator["name"]}
        if options.get("labels"):
            metadata["labels"] = dict(options["labels"])
        if options.get("annotations"):
            metadata["annotations"] = dict(options["annotations"])
        generated.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": data})
    return generated


# ---- build -----------------------------------------------------------------------------------------------

def read_documents(path: Path) -> list[dict]:
    return [document for document in yaml.safe_load_all(path.read_text()) if document]


def build(directory: Path | str) -> list[dict]:
    """The objects the kustomization in ``directory`` renders, in kustomize's legacy order."""
    directory = Path(directory)
    kustomization = yaml.safe_load(kustomization_file(directory).read_text()) or {}
    unsupported = set(kustomization) - SUPPORTED_FIELDS
    if unsupported:
        raise RenderError(f"{directory}: kustomization fields {sorted(unsupported)} are not supported by deploy.render; "
                          "render with kubectl kustomize")
    resources: list[dict] = []
    for entry in kustomization.get("resources", []):
        path = directory / entry
        resources.extend(build(path) if path.is_dir() else read_documents(path))
    resources.extend(generate_config_maps(directory, kustomization.get("configMapGenerator", [])))
    seen = set()
    for resource in resources:
        key = resource_id(resource)
        if key in seen:
            raise RenderError(f"{directory}: {key} is defined twice")
        seen.add(key)

    for patch in kustomization.get("patches", []):
        if set(patch) - {"path", "target"} or "path" not in patch or "target" not in patch:
            raise RenderError(f"{directory}: only JSON 6902 patches given by path and target are supported")
        operations = yaml.safe_load((directory / patch["path"]).read_text())
        if not isinstance(operations, list):
            raise RenderError(f"{patch['path']}: a strategic-merge patch; write it as a JSON 6902 list of operations")
        targets = [i for i, r in enumerate(resources) if _matches(r, patch["target"])]
        if not targets:
            raise RenderError(f"{directory}: patch {patch['path']} matches no resource ({patch['target']})")
        for index in targets:
            resources[index] = apply_json6902(resources[index], operations)
    if "namespace" in kustomization:
        set_namespace(resources, kustomization["namespace"])
    if "nameSuffix" in kustomization:
        add_name_suffix(resources, kustomization["nameSuffix"])
    set_images(resources, kustomization.get("images", []))
    return sorted(resources, key=legacy_sort_key)


def resource_id(resource: dict) -> tuple[str, str, str | None, str]:
    metadata = resource["metadata"]
    return resource["apiVersion"], resource["kind"], metadata.get("namespace"), metadata["name"]


def legacy_sort_key(resource: dict) -> tuple:
    kind = resource["kind"]
    if kind in LEGACY_ORDER:
        rank = (0, LEGACY_ORDER.index(kind), "")
    elif kind in LEGACY_LAST:
        rank = (2, LEGACY_LAST.index(kind), "")
    else:
        group, _, version = resource["apiVersion"].rpartition("/")
        rank = (1, 0, f"{group}/{version}/{kind}")
    return rank + (resource["metadata"].get("namespace") or "", resource["metadata"]["name"])


def to_yaml(resources: list[dict]) -> str:
    return yaml.safe_dump_all(resources, sort_keys=False, default_flow_style=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kustomization", type=Path, help="folder with a kustomization.yaml")
    args = parser.parse_args(argv)
    try:
        sys.stdout.write(to_yaml(build(args.kustomization)))
    except RenderError as error:
        print(f"cannot render {args.kustomization}: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
