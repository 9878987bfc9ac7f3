"""The domain rules as eventsourcing aggregates (patient, grant, data use) and the errors they raise."""
