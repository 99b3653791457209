"""The package's import graph: every module imports only from its own unit or the layers below it, so models,
data and evaluation never reach up into the trainers, the serving API or the command line, and the trainers
and the serving API, side by side, never import each other (both build the DiffRec model from below)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "minigpt4"
# Lowest first. A unit is a subpackage (data/, llm/, ...) or a top-level module (serving.py, ...); units that share
# a layer may not import each other.
LAYERS = [
    {"errors"},
    {"io", "hardware", "logs"},
    {"config"},
    {"data"},
    {"recommenders"},
    {"evaluation"},
    {"llm"},
    {"diffusion"},
    {"diffrec_model"},
    {"training", "serving"},
    {"demo", "app"},
    {"cli"},
]


def unit_of(path: Path) -> str:
    """The layer unit a source file belongs to."""
    return path.relative_to(PACKAGE).with_suffix("").parts[0]


def imported_units(path: Path) -> set[str]:
    """The package units a file imports, at module level or inside functions."""
    units = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = (
            [node.module]
            if isinstance(node, ast.ImportFrom) and node.module
            else [alias.name for alias in node.names]
            if isinstance(node, ast.Import)
            else []
        )
        units.update(name.split(".")[1] for name in names if name.startswith("minigpt4."))
    return units


def test_every_module_imports_only_its_own_layer_or_below():
    rank = {unit: index for index, layer in enumerate(LAYERS) for unit in layer}
    files = [path for path in PACKAGE.rglob("*.py") if path.name != "__init__.py" or path.parent != PACKAGE]
    unplaced = {unit_of(path) for path in files} - set(rank)
    assert not unplaced, f"place these in LAYERS: {sorted(unplaced)}"
    upward = [
        f"{path.relative_to(PACKAGE.parent)} imports minigpt4.{unit}"
        for path in files for unit in imported_units(path) if unit != unit_of(path) and rank[unit] >= rank[unit_of(path)]
    ]  # fmt: skip
    assert not upward, "\n".join(upward)


def test_the_check_sees_an_upward_import(tmp_path):
    """The parser finds imports inside functions too (where a cycle is usually dodged)."""
    source = tmp_path / "module.py"
    source.write_text("def late():\n    from minigpt4.training.llm import train_llm\n    import minigpt4.serving\n")
    assert imported_units(source) == {"training", "serving"}


def test_only_the_command_line_and_the_demo_import_the_trainers():
    """The acceptance rule in one line: outside training/, only cli.py and demo.py import it."""
    importers = {
        unit_of(path)
        for path in PACKAGE.rglob("*.py")
        if unit_of(path) != "training" and "training" in imported_units(path)
    }
    assert importers <= {"cli", "demo"}, sorted(importers)
