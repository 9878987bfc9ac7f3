"""The ledger in PostgreSQL: the writer, migrations, tiles, checkpoints and database connections — the one home of ledger SQL."""
