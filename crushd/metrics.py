"""Prometheus metrics of one server, for ``GET /metrics``.

Counters and histograms follow the workspaces' events: :class:`Metrics`
connects one permanent receiver to the server's ``event_published`` signal
before any workspace opens (blinker connects are not thread-safe), so it
sees every run from recovery on.  Gauges are read from memory when scraped.
Labels are bounded: run statuses, HTTP methods and status codes, never ids.

Each server has its own :class:`~prometheus_client.CollectorRegistry`, not
the library's global one, so several servers in one process (the tests, a
WSGI host with two apps) never collide.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from flask import Blueprint, Response, current_app
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from crushd.common import TERMINAL_STATUSES
from crushd.events import EventType
from crushd.signals import Signals

#: The exposition format every Prometheus server reads.
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4

#: Method labels; anything else is counted as ``other`` so a client cannot
#: grow the label set.
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"})

RUN_DURATION_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
FIRST_DELTA_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120)


class Metrics:
    """The metrics of one server.  Thread-safe.

    ``runs_active`` and ``runs_queued`` are functions read at each scrape
    (the workspaces' in-memory counts), ``event_streams`` likewise (open
    event-stream subscribers), ``checkpoint_bytes`` the checkpoint stores'
    size as last measured.  ``clock`` is monotonic seconds.
    """

    def __init__(
        self,
        signals: Signals,
        *,
        runs_active: Callable[[], int],
        runs_queued: Callable[[], int],
        event_streams: Callable[[], int],
        checkpoint_bytes: Callable[[], int] = lambda: 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._clock = clock
        self.runs_total = Counter(
            "crushd_runs",
            "Runs that reached a terminal status, by status.",
            ["status"],
            registry=self.registry,
        )
        for status in sorted(TERMINAL_STATUSES):
            self.runs_total.labels(status)
        Gauge(
            "crushd_runs_active", "Runs dispatched and not finished.", registry=self.registry
        ).set_function(runs_active)
        Gauge(
            "crushd_runs_queued", "Accepted runs waiting for their session.", registry=self.registry
        ).set_function(runs_queued)
        self.run_duration = Histogram(
            "crushd_run_duration_seconds",
            "From a run's start to its terminal record, for runs started by this process.",
            buckets=RUN_DURATION_BUCKETS,
            registry=self.registry,
        )
        self.first_delta = Histogram(
            "crushd_first_delta_seconds",
            "From a run's start to the first streamed delta of its answer.",
            buckets=FIRST_DELTA_BUCKETS,
            registry=self.registry,
        )
        self.provider_retries = Counter(
            "crushd_provider_retries",
            "Provider requests retried (one per run.retrying event).",
            registry=self.registry,
        )
        Gauge("crushd_event_streams", "Open event streams.", registry=self.registry).set_function(
            event_streams
        )
        Gauge(
            "crushd_checkpoint_store_bytes",
            "Disk the workspaces' checkpoint repositories take (measured now and then).",
            registry=self.registry,
        ).set_function(checkpoint_bytes)
        self.http_requests = Counter(
            "crushd_http_requests",
            "HTTP requests answered, by method and status code.",
            ["method", "status"],
            registry=self.registry,
        )
        # Guards _started: run id -> (start time, first delta seen).  An
        # entry lives from run.started to run.completed.
        self._started_lock = threading.Lock()
        self._started: dict[str, list[Any]] = {}  # guarded by _started_lock
        signals.event_published.connect(self._on_event, weak=False)

    def _on_event(self, sender: str, event: Any) -> None:
        """The signal receiver: runs on the publishing thread, after the hub
        released its lock; a few dictionary operations."""
        payload = event.data["payload"]
        if event.type == EventType.RUN_STARTED:
            with self._started_lock:
                self._started[payload["id"]] = [self._clock(), False]
        elif event.type == EventType.MESSAGE_DELTA:
            with self._started_lock:
                entry = self._started.get(payload.get("run_id", ""))
                first = entry is not None and not entry[1]
                if first:
                    entry[1] = True
            if first:
                self.first_delta.observe(max(0.0, self._clock() - entry[0]))
        elif event.type == EventType.RUN_RETRYING:
            self.provider_retries.inc()
        elif event.type == EventType.RUN_COMPLETED:
            with self._started_lock:
                entry = self._started.pop(payload["id"], None)
            if entry is not None:
                self.run_duration.observe(max(0.0, self._clock() - entry[0]))
            self.runs_total.labels(payload["status"]).inc()

    def count_request(self, method: str, status: int) -> None:
        method = method.upper()
        self.http_requests.labels(method if method in HTTP_METHODS else "other", str(status)).inc()

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)


metrics_routes = Blueprint("metrics", __name__)


@metrics_routes.get("/metrics")
def scrape() -> Any:
    """The server's metrics (behind the token and the browser guard like the API)."""
    metrics: Metrics = current_app.extensions["crushd"].metrics
    return Response(
        metrics.render(), content_type=CONTENT_TYPE, headers={"Cache-Control": "no-cache"}
    )
