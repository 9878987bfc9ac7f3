"""Wire and storage contracts of consent-ledger. Pure data and pure functions:
nothing here does I/O or imports the rest of the project."""
