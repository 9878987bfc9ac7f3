"""consent-ledger service: domain rules, event store, HTTP API and CLI."""

__version__ = "0.1.0"
