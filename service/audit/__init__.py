"""Checking the log without trusting its operator: the chain verifier, the decision audit and the verify/export client."""
