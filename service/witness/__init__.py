"""A C2SP tlog-witness for consent-ledger logs (or any log of C2SP checkpoints).

It cosigns a log's checkpoint only after checking the log's signature and a
consistency proof from the last checkpoint it cosigned for that log, so it
never cosigns two views of one log that disagree: an oversight body runs one
to make a forked or rolled-back log visible.  ``consent-ledger witness serve``
runs it; ``service.witness.cli`` holds the command line.
"""
