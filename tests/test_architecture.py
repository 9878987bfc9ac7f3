"""The import arrows of DESIGN.md: service -> projections -> contracts."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BANNED = {"contracts": {"service", "projections"}, "projections": {"service"}}


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("package", sorted(BANNED))
def test_lower_layers_never_import_higher_ones(package: str):
    offenders = {
        str(path.relative_to(ROOT)): sorted(_imports(path) & BANNED[package])
        for path in (ROOT / package).rglob("*.py")
        if _imports(path) & BANNED[package]
    }
    assert offenders == {}


def test_the_check_sees_a_banned_import(tmp_path: Path):
    bad = tmp_path / "m.py"
    bad.write_text("from service.store import EventStore\nimport projections.runner\n")
    assert _imports(bad) >= {"service", "projections"}
