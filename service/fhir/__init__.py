"""FHIR R4: the ledger's choices and history as resources a FHIR client reads (contracts/FHIR-MAPPING.md)."""
