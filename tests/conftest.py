"""Shared fixtures (a real Triton server on the CPU model repository, labelled sample boards) and the test tiers.

Tiers are markers, applied here from what a test uses: ``live`` (the tritonserver fixture), ``data`` (the
DeepPCB trainval folder), ``slow`` (a fixture in SLOW_FIXTURES, which takes several seconds). A test that
starts its own server or is slow by itself carries the mark (tests/test_tiers.py checks the first); ``gpu``
tests mark themselves and skip without one.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tools.contract import REPO_ROOT
from tools.data.deeppcb import DEFAULT_ROOT, Sample, read_split
from tools.data.splits import select_samples
from tools.serve.triton_server import TritonServer

SYNTHETIC_BOARD_COUNT = 6
DEEPPCB_BOARD_COUNT = 8


# Fixtures that need no server but take several seconds (measured with --durations).
SLOW_FIXTURES = {
    "converted",  # tests/test_fp16_conversion.py: the FP16 conversion of the detector, ~10 s
}


def pytest_collection_modifyitems(items):
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if "triton_server" in fixtures:
            item.add_marker(pytest.mark.live)
        if "deeppcb_root" in fixtures:
            item.add_marker(pytest.mark.data)
        if fixtures & SLOW_FIXTURES:
            item.add_marker(pytest.mark.slow)


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
    """Synthetic DeepPCB-style boards with labelled defects (tools.data.synth_boards, fixed seed)."""
    out = tmp_path_factory.mktemp("synthetic_boards")
    subprocess.run(
        [sys.executable, "-m", "tools.data.synth_boards", "--out", str(out), "--count", str(SYNTHETIC_BOARD_COUNT),
         "--seed", "0", "--list-file", "test.txt"],
        cwd=REPO_ROOT, check=True, capture_output=True,
    )
    return read_split(out, "test.txt")


@pytest.fixture(scope="session")
def labelled_boards(synthetic_boards) -> list[Sample]:
    """Real DeepPCB boards of the held-out groups when the dataset is here, else synthetic boards. The shipped
    detector learnt every trainval board, so these check the served path end to end, not accuracy on new designs
    (tools.eval measures that, of validation/heldout_groups)."""
    if (DEFAULT_ROOT / "trainval.txt").is_file():
        return select_samples(DEFAULT_ROOT, "trainval.txt", "val")[:DEEPPCB_BOARD_COUNT]
    return synthetic_boards


@pytest.fixture(scope="session")
def board_bytes(synthetic_boards) -> bytes:
    """One encoded synthetic board (JPEG, 640x640, grey) with labelled defects."""
    return Path(synthetic_boards[0].image_path).read_bytes()
