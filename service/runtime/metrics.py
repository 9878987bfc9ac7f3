"""Prometheus metrics: request counts and latency, and the ledger's own
state (head, write queue, projections, filter, checkpoint, database up,
background tasks' restarts and last success) read at scrape time.  No
label ever carries personal data: routes are templates."""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from service.runtime.supervisor import Supervisor

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    """One registry per app, so several apps in one process do not collide."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "consent_ledger_http_requests", "HTTP requests answered, by route template and status",
            ["method", "route", "status"], registry=self.registry,
        )
        self.latency = Histogram(
            "consent_ledger_http_request_seconds", "Time to answer an HTTP request, by route template",
            ["method", "route"], registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.head = Gauge("consent_ledger_head_position", "Ledger head position", registry=self.registry)
        self.queued = Gauge("consent_ledger_write_queue", "Appends waiting for the writer", registry=self.registry)
        self.checkpoint = Gauge("consent_ledger_checkpoint_size", "Tree size of the latest signed checkpoint",
                                registry=self.registry)
        self.projection = Gauge("consent_ledger_projection_position", "Position each projection has applied",
                                ["projection"], registry=self.registry)
        self.filter = Gauge("consent_ledger_opt_out_filter_position",
                            "Position the in-memory opt-out filter reflects", registry=self.registry)
        self.database_up = Gauge("consent_ledger_database_up",
                                 "1 if the database answered this scrape, else 0", registry=self.registry)
        self.task_restarts = Gauge("consent_ledger_task_restarts",
                                   "Times a background task failed and was restarted since the process started",
                                   ["task"], registry=self.registry)
        self.task_last_success = Gauge("consent_ledger_task_last_success_timestamp_seconds",
                                       "Unix time a background task last made progress (0: not yet)",
                                       ["task"], registry=self.registry)
        self.task_stalled = Gauge("consent_ledger_task_stalled",
                                  "1 while a background task has made no progress for too long (/readyz is 503)",
                                  ["task"], registry=self.registry)

        self.witnessed = Gauge("consent_ledger_witnessed_size",
                               "Tree size of the latest checkpoint a quorum of the witnesses cosigned (0: none yet)",
                               registry=self.registry)
        self.witness_cosigned = Gauge("consent_ledger_witness_cosigned_size",
                                      "Tree size of the latest checkpoint each witness cosigned",
                                      ["witness"], registry=self.registry)
        self.replica_lag = Gauge("consent_ledger_replica_lag_entries",
                                 "Entries a read replica trails the primary by, at its last check",
                                 ["replica"], registry=self.registry)
        self.replica_in_rotation = Gauge("consent_ledger_replica_in_rotation",
                                         "1 while a read replica serves reads, 0 while it is out of rotation",
                                         ["replica"], registry=self.registry)
        self.reads_served = Gauge("consent_ledger_reads_served",
                                  "Projection and tile reads served since start, by where they were read",
                                  ["source"], registry=self.registry)

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(method, route).observe(seconds)

    def tasks(self, supervisor: Supervisor) -> None:
        stalled = {s.task for s in supervisor.stalls()}
        for name, state in supervisor.tasks.items():
            self.task_restarts.labels(name).set(state.restarts)
            self.task_last_success.labels(name).set(state.last_success_at or 0)
            self.task_stalled.labels(name).set(name in stalled)

    def render(self) -> bytes:
        return generate_latest(self.registry)
