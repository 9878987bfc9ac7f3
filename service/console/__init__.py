"""What command-line tools show a person: one-line failures with exit statuses, and progress."""
