"""What keeps a process healthy: the task supervisor, worker threads, logging and metrics."""
