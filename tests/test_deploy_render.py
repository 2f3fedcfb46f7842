"""deploy.render renders every kustomization of deploy/k8s exactly as kustomize does, and refuses what it does not do.

The other deploy tests render with deploy.render, which runs anywhere; where kustomize is installed (as
`kustomize` or inside `kubectl`), this compares the two renderings object for object and in order.
"""
from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

from deploy.render import KUSTOMIZATIONS, RenderError, apply_json6902, build, resource_id, split_image


def kustomize_command() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_render_matches_kustomize(name):
    command = kustomize_command()
    if command is None:
        pytest.skip("no kustomize here (neither kustomize nor kubectl on PATH): rendered by deploy.render only")
    result = subprocess.run(command + [str(KUSTOMIZATIONS[name])], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    theirs = [o for o in yaml.safe_load_all(result.stdout) if o]
    ours = build(KUSTOMIZATIONS[name])
    assert [resource_id(o) for o in ours] == [resource_id(o) for o in theirs]
    for mine, expected in zip(ours, theirs):
        assert mine == expected, resource_id(mine)


def test_json6902_operations():
    document = {"a": {"b": [1, 2]}, "c/d": 1}
    patched = apply_json6902(document, [
        {"op": "test", "path": "/a/b/0", "value": 1},
        {"op": "add", "path": "/a/b/-", "value": 3},
        {"op": "add", "path": "/a/b/0", "value": 0},
        {"op": "replace", "path": "/c~1d", "value": 2},
        {"op": "copy", "from": "/a/b", "path": "/e"},
        {"op": "remove", "path": "/a/b/1"},
    ])
    assert patched == {"a": {"b": [0, 2, 3]}, "c/d": 2, "e": [0, 1, 2, 3]}
    assert document == {"a": {"b": [1, 2]}, "c/d": 1}  # the input is left alone
    with pytest.raises(RenderError, match="test failed"):
        apply_json6902(document, [{"op": "test", "path": "/c~1d", "value": 5}])
    with pytest.raises(RenderError, match="does not exist"):
        apply_json6902(document, [{"op": "replace", "path": "/x/y", "value": 5}])


def test_image_references_split_like_kustomize():
    assert split_image("registry:5000/pcb/pcb-inspect:26.08") == ("registry:5000/pcb/pcb-inspect", "26.08", None)
    assert split_image("pcb-inspect") == ("pcb-inspect", None, None)
    assert split_image("r/p@sha256:ab") == ("r/p", None, "sha256:ab")


@pytest.mark.parametrize("kustomization, message", [
    ({"commonLabels": {"a": "b"}}, "not supported"),
    ({"resources": ["x.yaml"], "patches": [{"path": "smp.yaml", "target": {"kind": "ConfigMap"}}]}, "strategic-merge"),
    ({"resources": ["x.yaml"], "patches": [{"path": "p.yaml", "target": {"kind": "Secret"}}]}, "matches no resource"),
    ({"configMapGenerator": [{"name": "g", "files": ["x.yaml"]}]}, "disableNameSuffixHash"),
    ({"resources": ["x.yaml", "x.yaml"]}, "defined twice"),
])
def test_what_it_does_not_do_is_an_error(tmp_path, kustomization, message):
    (tmp_path / "x.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: x\n")
    (tmp_path / "smp.yaml").write_text("metadata:\n  labels:\n    a: b\n")
    (tmp_path / "p.yaml").write_text("- op: add\n  path: /data\n  value: {}\n")
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    with pytest.raises(RenderError, match=message):
        build(tmp_path)
