"""Prometheus metrics: request counts and latency, and the ledger's own
state (head, write queue, projections, filter, checkpoint) read at scrape
time.  No label ever carries personal data: routes are templates."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

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

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(method, route).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
