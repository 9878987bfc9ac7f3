"""Notifications to patient app backends: subscriptions, the outbox a tracked
cursor fills from the log, and delivery as signed Standard Webhooks."""
