"""What the files in deploy/ are checked against: the environment variables
service/config.py reads, the role provisioning deploy/POSTGRES-ROLES.md
documents, and the PostgreSQL settings deploy/POSTGRES.md explains."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"

# Introduced by issue 17 part B (reads from streaming replicas); the deploy
# files set it already, and releases before part B ignore it.
READ_REPLICA_VARIABLE = "CONSENT_LEDGER_READ_DATABASE_URL"


def config_variables() -> set[str]:
    """Every environment variable service/config.py reads."""
    text = (ROOT / "service" / "config.py").read_text()
    return set(re.findall(r'env(?:\.get\(|\[|, )"([A-Z][A-Z0-9_]*)"', text))


def sql_statements(text: str) -> list[str]:
    """SQL statements, whitespace normalised, without comments or psql meta-commands (``\\c db``)."""
    lines = [line.split("--")[0] for line in text.splitlines() if not line.lstrip().startswith("\\")]
    return [" ".join(stmt.split()) for stmt in "\n".join(lines).split(";") if stmt.strip()]


def documented_provisioning() -> list[str]:
    """The statements of POSTGRES-ROLES.md's provisioning block, in order."""
    block = re.search(r"```sql\n(.*?)```", (DEPLOY / "POSTGRES-ROLES.md").read_text(), re.S)
    assert block, "POSTGRES-ROLES.md has a sql block of provisioning statements"
    return sql_statements(block.group(1))


def undocumented_settings(names: list[str]) -> list[str]:
    """PostgreSQL settings that deploy/POSTGRES.md does not explain."""
    notes = (DEPLOY / "POSTGRES.md").read_text()
    return [name for name in names if f"`{name}" not in notes]
