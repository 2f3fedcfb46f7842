"""Shared fixtures: a real Triton server on the CPU model repository, and labelled sample boards."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tools.deeppcb import DEFAULT_ROOT, Sample, read_split, split_train_val
from tools.triton_server import REPO_ROOT, TritonServer

SYNTHETIC_BOARD_COUNT = 6
DEEPPCB_BOARD_COUNT = 8


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs an NVIDIA GPU; such tests skip themselves, with the reason, without one")


@pytest.fixture(scope="session")
def deeppcb_root() -> Path:
    """The DeepPCB trainval folder; missing data skips the test, except on CI where it is an error."""
    if not (DEFAULT_ROOT / "trainval.txt").is_file():
        message = f"DeepPCB trainval not found at {DEFAULT_ROOT} (set DEEPPCB_ROOT)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return DEFAULT_ROOT


@pytest.fixture(scope="session")
def triton_server():
    """tritonserver on models/ with the CPU configs, on free ports; stopped after the session."""
    with TritonServer.on_free_ports(model_config_name="cpu") as server:
        yield server


@pytest.fixture(scope="session")
def synthetic_boards(tmp_path_factory) -> list[Sample]:
    """Synthetic DeepPCB-style boards with labelled defects (tools.synth_boards, fixed seed)."""
    out = tmp_path_factory.mktemp("synthetic_boards")
    subprocess.run(
        [sys.executable, "-m", "tools.synth_boards", "--out", str(out), "--count", str(SYNTHETIC_BOARD_COUNT),
         "--seed", "0", "--list-file", "test.txt"],
        cwd=REPO_ROOT, check=True, capture_output=True,
    )
    return read_split(out, "test.txt")


@pytest.fixture(scope="session")
def labelled_boards(synthetic_boards) -> list[Sample]:
    """Real DeepPCB boards the detector was not trained on when the dataset is here, else synthetic boards."""
    if (DEFAULT_ROOT / "trainval.txt").is_file():
        _, held_out = split_train_val(read_split(DEFAULT_ROOT, "trainval.txt"))
        return held_out[:DEEPPCB_BOARD_COUNT]
    return synthetic_boards


@pytest.fixture(scope="session")
def board_bytes(synthetic_boards) -> bytes:
    """One encoded synthetic board (JPEG, 640x640, grey) with labelled defects."""
    return Path(synthetic_boards[0].image_path).read_bytes()
