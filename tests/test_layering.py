"""The import layering of tools/ (DEVELOPING.md): each package imports only from lower layers, and the model
repository never imports from the repository root."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tools.contract import MODELS_ROOT, REPO_ROOT

TOOLS = REPO_ROOT / "tools"
# Layer of each part of tools/; a module may import its own part and any part of a lower layer.
LAYERS = {
    "contract": 0, "detections": 0, "pipeline_math": 0,
    "data": 1, "serve": 1,
    "client": 2, "train": 2, "healthcheck": 2,
    "engine": 3, "eval": 3,
    "arguments": 4,  # command-line glue: only commands (a __main__.py, a module with main()) import it
    "soak": 4,
    "demo": 5,
}
CORE = 0  # the core modules may import each other
ENTRY_POINT_ONLY = {"arguments"}


def part_of(module: str) -> str:
    return module.split(".")[1]


def tools_imports(tree: ast.Module) -> list[str]:
    """The tools modules a file imports, anywhere in it."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tools."):
            found.append(node.module)
        elif isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names if alias.name.startswith("tools."))
    return found


def is_command(path: Path, tree: ast.Module) -> bool:
    return path.name == "__main__.py" or any(
        isinstance(node, ast.FunctionDef) and node.name in ("main", "parse_args") for node in tree.body)


TOOL_FILES = sorted(p for p in TOOLS.rglob("*.py") if p.name != "__init__.py" or p.parent != TOOLS)


def test_every_part_of_tools_has_a_layer():
    parts = {p.relative_to(TOOLS).parts[0].removesuffix(".py") for p in TOOL_FILES}
    assert parts == set(LAYERS)


@pytest.mark.parametrize("path", TOOL_FILES, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_tools_import_only_lower_layers(path):
    own = path.relative_to(TOOLS).parts[0].removesuffix(".py")
    tree = ast.parse(path.read_text())
    for module in tools_imports(tree):
        target = part_of(module)
        if target == own or LAYERS[target] == LAYERS[own] == CORE:
            continue
        allowed = LAYERS[target] < LAYERS[own] and target not in ENTRY_POINT_ONLY
        assert allowed or (target in ENTRY_POINT_ONLY and is_command(path, tree)), (
            f"{path.relative_to(REPO_ROOT)} imports {module}: layer {LAYERS[own]} ({own}) may not import "
            f"layer {LAYERS[target]} ({target})"
        )


@pytest.mark.parametrize("path", sorted(MODELS_ROOT.rglob("*.py")), ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_models_import_nothing_from_the_repository(path):
    """Each model folder is copied to a model store on its own: only its own 1/ helpers may be imported."""
    tree = ast.parse(path.read_text())
    own_helpers = {p.stem for p in path.parent.glob("*.py")}
    other_models = {p.name for p in MODELS_ROOT.iterdir() if p.is_dir()}
    for node in ast.walk(tree):
        names = ([node.module] if isinstance(node, ast.ImportFrom) and node.module else
                 [a.name for a in node.names] if isinstance(node, ast.Import) else [])
        for name in names:
            top = name.split(".")[0]
            assert top not in ("tools", "tests", "models", *other_models - own_helpers), f"{path}: imports {name}"
