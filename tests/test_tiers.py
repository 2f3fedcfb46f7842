"""The test tiers are applied from what a test uses (tests/conftest.py), so `make unit` starts no server."""
from __future__ import annotations

import ast
import subprocess
import sys

from tools.contract import REPO_ROOT


def collected(marker_expression: str, *paths: str) -> set[str]:
    """Test ids pytest selects with ``-m marker_expression`` among ``paths``, without running them."""
    result = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", marker_expression, *paths],
                            cwd=REPO_ROOT, capture_output=True, text=True)
    return {line for line in result.stdout.splitlines() if "::" in line}


def test_tests_using_the_server_fixture_are_live_and_left_out_of_the_unit_tier():
    live = collected("live", "tests/test_client.py")
    unit = collected("not live and not slow and not gpu", "tests/test_client.py")
    assert "tests/test_client.py::test_infer_files_names_the_failed_file" in live
    assert "tests/test_client.py::test_find_images_expands_folders_and_rejects_missing" in unit
    assert live and unit and not live & unit


def test_data_and_slow_markers_follow_the_fixtures():
    data = collected("data", "tests/test_training.py", "tests/test_fp16_conversion.py")
    slow = collected("slow", "tests/test_training.py", "tests/test_fp16_conversion.py")
    assert "tests/test_training.py::test_short_training_resumes_and_exports" in data
    assert "tests/test_training.py::test_short_training_resumes_and_exports" in slow  # marked by hand
    assert {test for test in slow if test.startswith("tests/test_fp16_conversion.py::")}, "the FP16 conversion fixture"
    assert "tests/test_training.py::test_assignment_prefers_smallest_box_and_centre_region" not in slow
    assert "tests/test_training.py::test_assignment_prefers_smallest_box_and_centre_region" not in data


def starts_a_server(function: ast.FunctionDef) -> bool:
    """Whether a test's body starts a tritonserver itself (``X.on_free_ports(...)``, ``server.start()``, or the
    ``tools.serve`` command)."""
    return any((isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("on_free_ports", "start"))
               or (isinstance(node, ast.Constant) and node.value == "tools.serve") for node in ast.walk(function))


def test_tests_that_start_their_own_server_are_marked_live():
    unmarked = []
    for path in sorted((REPO_ROOT / "tests").glob("test_*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_") and starts_a_server(node):
                marks = {ast.unparse(d) for d in node.decorator_list}
                if "pytest.mark.live" not in marks and "triton_server" not in {a.arg for a in node.args.args}:
                    unmarked.append(f"{path.name}::{node.name}")
    assert not unmarked, f"start a tritonserver without @pytest.mark.live: {unmarked}"
