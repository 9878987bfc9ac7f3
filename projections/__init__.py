"""Read models built from the ledger: tracked, exactly-once, rebuildable.

Imports ``contracts`` (and asyncpg, numpy), never ``service``.
"""
