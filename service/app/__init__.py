"""The application: who is asking (caller), the ledger's commands and reads, the assessor port, read records."""
