"""The import arrows (ARCHITECTURE.md): contracts <- projections <- service,
and inside service, rooms that depend on each other in one direction only."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OURS = {"contracts", "projections", "service", "bench", "tests"}
# Which of our top-level packages each may import.
ALLOWED = {
    "contracts": set(),
    "projections": {"contracts"},
    "service": {"contracts", "projections"},
}
# Which rooms of service/ each room may import (besides config and __version__).
ROOMS = {
    "domain": set(),
    "runtime": set(),
    "console": {"domain", "store"},  # explains their errors in plain words
    "store": {"runtime"},
    "auth": {"app"},
    "app": {"domain", "store", "runtime"},
    "audit": {"store", "console"},
    "witness": {"store", "runtime", "console"},
    "composition": {"app", "store", "runtime", "witness", "notify"},
    "notify": {"store"},  # subscriptions, the outbox the notifier fills from the log, webhook delivery  # the root that builds a running ledger
    "fhir": {"domain"},  # the ledger's records as FHIR resources, and imported ones as domain values
    "pages": set(),  # templates, static files, charts and the patient page's API client
    "http": {"app", "audit", "auth", "composition", "domain", "fhir", "notify", "pages", "store", "runtime"},
    "cli": {"app", "audit", "auth", "composition", "domain", "fhir", "http", "runtime", "store", "witness", "console"},
}
SHARED = {"config", "__version__"}


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            if node.module == "service":
                found.update(f"service.{alias.name}" for alias in node.names)
    return found


def _room_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = defaultdict(set)
    for path in (ROOT / "service").rglob("*.py"):
        room = path.relative_to(ROOT / "service").parts[0].removesuffix(".py")
        if room in SHARED or room == "__init__":
            continue
        for module in _imports(path):
            names = module.split(".")
            if names[0] == "service" and len(names) > 1 and names[1] != room and names[1] not in SHARED:
                graph[room].add(names[1])
    return graph


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_packages_import_only_what_is_below_them(package: str):
    offenders = {}
    for path in (ROOT / package).rglob("*.py"):
        ours = {m.split(".")[0] for m in _imports(path)} & OURS - {package}
        if ours - ALLOWED[package]:
            offenders[str(path.relative_to(ROOT))] = sorted(ours - ALLOWED[package])
    assert offenders == {}


def test_every_room_is_listed_and_keeps_to_its_arrows():
    rooms = {p.name for p in (ROOT / "service").iterdir() if (p / "__init__.py").exists()}
    rooms |= {p.stem for p in (ROOT / "service").glob("*.py")} - SHARED - {"__init__"}
    assert rooms == set(ROOMS), "a new room needs its arrows in ROOMS (and a line in ARCHITECTURE.md)"
    graph = _room_graph()
    assert {room: sorted(targets - ROOMS[room]) for room, targets in graph.items() if targets - ROOMS[room]} == {}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path + [node, nxt]
            if nxt not in state and (found := visit(nxt, path + [node])):
                return found
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node, [])):
            return found
    return None


def test_rooms_form_no_cycle():
    assert _cycle(_room_graph()) is None
    assert _cycle({room: set(targets) for room, targets in ROOMS.items()}) is None


def test_the_checks_see_a_banned_import_and_a_cycle(tmp_path: Path):
    bad = tmp_path / "m.py"
    bad.write_text("from service.store.event_store import EventStore\nimport projections.runner\nimport bench.machine\n")
    assert {m.split(".")[0] for m in _imports(bad)} >= {"service", "projections", "bench"}
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) is not None
    assert _cycle({"a": {"b"}, "b": {"c"}}) is None


def test_every_setting_reaches_the_code_that_uses_it():
    """A Config field nobody reads is a setting that silently does nothing
    (the wiring once copied Config into keyword arguments and dropped two)."""
    import dataclasses

    from service.config import Config

    read: set[str] = set()
    for package in ("service", "projections"):
        for path in (ROOT / package).rglob("*.py"):
            if path.name != "config.py":
                read |= {n.attr for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Attribute)}
    config_source = ast.parse((ROOT / "service" / "config.py").read_text())
    # Fields read by a property of Config count when the property is read.
    through_properties = {
        attr.attr
        for node in ast.walk(config_source) if isinstance(node, ast.FunctionDef) and node.name in read
        for attr in ast.walk(node) if isinstance(attr, ast.Attribute)
    }
    unread = [f.name for f in dataclasses.fields(Config) if f.name not in read | through_properties]
    assert unread == []
