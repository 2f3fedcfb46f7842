"""Static checks of the GPU-only lines, which cannot run here (no GPU on the development and CI machines).

* pyflakes rules (ruff ``F``) over models/, tools/ and tests/: an undefined name or a typo in a GPU branch
  fails here instead of on the first GPU.
* The shared array code and the models' glue call, through ``xp``, only functions that the CuPy of the
  serving image has, with arguments those functions accept. CuPy imports without a GPU; only running it
  needs one.
* Functions that take ``xp`` never reach for NumPy or OpenCV themselves: on GPU instances that would pull
  the data to the host or fail on a CuPy array.
"""
from __future__ import annotations

import ast
import inspect
import subprocess
import sys
from pathlib import Path

import cupy  # requirements/gpu-tools.txt: the serving image's pin; imports without a GPU
import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
SHARED_ARRAY_CODE = [MODELS / "preprocess" / "1" / "image_ops.py", MODELS / "postprocess" / "1" / "box_ops.py"]
GLUE = [MODELS / "preprocess" / "1" / "model.py", MODELS / "postprocess" / "1" / "model.py"]
SERVING_REQUIREMENTS = ROOT / "docker" / "requirements-serving.txt"
HOST_ONLY_MODULES = {"np", "cv2"}


def test_pyflakes_finds_nothing():
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--select", "F", "--no-cache", "models", "tools", "tests"],
        cwd=ROOT, capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def serving_image_pin(name: str) -> str:
    lines = (line.split("#")[0].strip() for line in SERVING_REQUIREMENTS.read_text().splitlines())
    for requirement in (Requirement(line) for line in lines if line):
        if requirement.name == name:
            return str(requirement.specifier).removeprefix("==")
    raise AssertionError(f"{name} is not pinned in {SERVING_REQUIREMENTS}")


def test_the_checked_cupy_is_the_one_the_serving_image_installs():
    from importlib.metadata import version

    assert version("cupy-cuda13x") == serving_image_pin("cupy-cuda13x")


def uses_xp(node: ast.expr) -> bool:
    """``xp`` (a function's array-module parameter) or ``self.xp`` (the model's)."""
    return (isinstance(node, ast.Name) and node.id == "xp") or (isinstance(node, ast.Attribute) and node.attr == "xp")


def xp_calls(path: Path):
    """(line, function name, positional count, keyword names) of every ``xp.NAME(...)`` call in a file."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and uses_xp(node.func.value):
            yield node.lineno, node.func.attr, len(node.args), [keyword.arg for keyword in node.keywords]


def test_the_files_checked_do_call_through_xp():
    for path in SHARED_ARRAY_CODE + GLUE:
        assert list(xp_calls(path)), f"{path.name}: no xp calls found; has the array-module name changed?"


def call_problem(name: str, positional: int, keywords: list[str]) -> str | None:
    """Why ``cupy.NAME(<positional args>, **keywords)`` cannot be called, or None."""
    function = getattr(cupy, name, None)
    if function is None:
        return "CuPy has no such function"
    if isinstance(function, cupy.ufunc):
        if positional != function.nin or keywords:
            return f"ufunc takes {function.nin} array arguments; called with {positional} and {keywords}"
        return None
    try:
        signature = inspect.signature(function)
    except ValueError:  # compiled function without a signature (from_dlpack): existence is what can be checked
        return None
    try:
        signature.bind(*[None] * positional, **dict.fromkeys(keywords))
    except TypeError as exc:
        return str(exc)
    return None


@pytest.mark.parametrize("path", SHARED_ARRAY_CODE + GLUE, ids=lambda path: f"{path.parent.parent.name}/{path.name}")
def test_every_xp_call_is_one_cupy_accepts(path):
    problems = [
        f"{path.name}:{line} xp.{name}: {problem}"
        for line, name, positional, keywords in xp_calls(path)
        if (problem := call_problem(name, positional, keywords))
    ]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("path", SHARED_ARRAY_CODE, ids=lambda path: path.name)
def test_functions_taking_xp_use_no_host_only_module(path):
    problems = []
    for function in ast.walk(ast.parse(path.read_text())):
        if not isinstance(function, ast.FunctionDef) or "xp" not in [arg.arg for arg in function.args.args]:
            continue
        problems += [  # the body only: ``xp=np`` as a default is the CPU path's choice, not a host call
            f"{path.name}:{node.lineno} {function.name} uses {node.id}"
            for statement in function.body
            for node in ast.walk(statement)
            if isinstance(node, ast.Name) and node.id in HOST_ONLY_MODULES
        ]
    assert not problems, "\n".join(problems)
