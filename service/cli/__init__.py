"""The `consent-ledger` command: serve, demo, doctor, tokens, keys, verify and export."""
