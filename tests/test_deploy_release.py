"""Model releases on the store (deploy/k8s/engine-build/publish_release.py), run on CPU with a stand-in for the
TensorRT build: a release is published whole or not at all, never replaced, read-only, with its provenance
and checksums; the serving pods' start-up check reads what it writes.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import importlib.util
import json
import subprocess
from pathlib import Path

import pytest
import yaml

from deploy.render import K8S
from tools.contract import MODELS_ROOT, served_contract

SCRIPT = K8S / "engine-build" / "publish_release.py"
NOW = dt.datetime(2026, 12, 1, 9, 15, 0, tzinfo=dt.timezone.utc)
GPU = {"name": "NVIDIA L4", "compute_capability": "8.9", "driver_version": "580.95.05"}


@pytest.fixture(scope="module")
def publish_release():
    spec = importlib.util.spec_from_file_location("publish_release", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def source(tmp_path) -> Path:
    """A copy of this checkout's model repository, as the engine-builder image holds it."""
    import shutil

    return Path(shutil.copytree(MODELS_ROOT, tmp_path / "image-models", ignore=shutil.ignore_patterns("*.plan")))


def fake_build(models: Path, detector: str, store: Path, data: Path) -> None:
    (models / detector / "1" / "model.plan").write_bytes(b"engine built for " + data.name.encode())


def failing_build(models: Path, detector: str, store: Path, data: Path) -> None:
    raise subprocess.CalledProcessError(1, ["python3", "-m", "tools.engine.validate"])


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_validated_build_is_published_whole_read_only_with_provenance(publish_release, source, tmp_path):
    store, detector = tmp_path / "store", served_contract().detector_model
    release = publish_release.make_release(store, source, tmp_path / "deeppcb", gpu=GPU, tensorrt="10.15.1",
                                           detector=detector, build=fake_build, now=NOW, extra={"node": "gpu-1"})
    onnx_sha = sha256(source / detector / "1" / "model.onnx")
    assert release == store / "releases" / f"20261201T091500Z-{onnx_sha[:12]}-nvidia-l4"
    assert list((store / "staging").iterdir()) == []
    provenance = json.loads((release / "RELEASE.json").read_text())
    assert provenance == {
        "release": release.name, "built_at": "2026-12-01T09:15:00Z", "detector": detector,
        "source_onnx_sha256": onnx_sha, "source_fp16_onnx_sha256": sha256(source / detector / "1" / "model.fp16.onnx"),
        "engine_sha256": sha256(release / "models" / detector / "1" / "model.plan"),
        "tensorrt_version": "10.15.1", "gpu": GPU, "node": "gpu-1",
    }
    # SHA256SUMS covers every other file, in sha256sum -c format.
    sums = dict(reversed(line.split("  ", 1)) for line in (release / "SHA256SUMS").read_text().splitlines())
    files = {str(p.relative_to(release)) for p in release.rglob("*") if p.is_file()} - {"SHA256SUMS"}
    assert set(sums) == files and all(sums[f] == sha256(release / f) for f in files)
    assert subprocess.run(["sha256sum", "--quiet", "-c", "SHA256SUMS"], cwd=release).returncode == 0
    # Read-only, folders included: nothing can change a published release in place.
    for path in [release, *release.rglob("*")]:
        assert path.stat().st_mode & 0o222 == 0, path
    # The served repository is the image's, plus the engine.
    assert {p.name for p in (release / "models").iterdir()} == {p.name for p in source.iterdir()}


def test_a_release_is_never_replaced(publish_release, source, tmp_path):
    store, detector = tmp_path / "store", served_contract().detector_model
    first = publish_release.make_release(store, source, tmp_path, gpu=GPU, tensorrt="10.15.1", detector=detector,
                                         build=fake_build, now=NOW)
    before = (first / "RELEASE.json").read_text()
    with pytest.raises(FileExistsError, match="immutable"):
        publish_release.make_release(store, source, tmp_path, gpu=GPU, tensorrt="11.0.0", detector=detector,
                                     build=fake_build, now=NOW)
    assert (first / "RELEASE.json").read_text() == before
    assert list((store / "staging").iterdir()) == []


def test_a_failed_build_or_validation_publishes_nothing(publish_release, source, tmp_path):
    store = tmp_path / "store"
    with pytest.raises(subprocess.CalledProcessError):
        publish_release.make_release(store, source, tmp_path, gpu=GPU, tensorrt="10.15.1",
                                     detector=served_contract().detector_model, build=failing_build, now=NOW)
    assert not (store / "releases").exists() or list((store / "releases").iterdir()) == []
    assert list((store / "staging").iterdir()) == []


def test_cpu_only_release_from_the_command_line_has_no_engine_and_gpu_pods_refuse_it(publish_release, source,
                                                                                      tmp_path, capsys):
    store = tmp_path / "store"
    assert publish_release.main(["--store", str(store), "--source", str(source), "--data", str(tmp_path),
                                 "--cpu-only"]) == 0
    (release,) = (store / "releases").iterdir()
    assert release.name.endswith("-cpu-only")
    assert capsys.readouterr().out.strip().endswith(f"published release {release.name}")
    text = (release / "RELEASE.json").read_text()
    assert json.loads(text)["engine_sha256"] is None and json.loads(text)["gpu"] is None
    assert not list(release.rglob("*.plan"))
    # The server's start-up check greps for exactly this text unless it runs the CPU configs.
    (deployment,) = yaml.safe_load_all((K8S / "server" / "deployment.yaml").read_text())
    script = deployment["spec"]["template"]["spec"]["containers"][0]["args"][0]
    (marker,) = [line.split("grep -q '")[1].split("'")[0] for line in script.splitlines() if "grep -q" in line]
    assert marker in text
