"""Prometheus metrics: what a platform team graphs and alerts on, never a patient's data.

Requests and latency per route and status, patients scored, explanations computed,
prediction warnings by code, the serving model as an info metric, and model loads by
outcome. With several workers (`ITP_WORKERS`), `itp-serve` points
`PROMETHEUS_MULTIPROC_DIR` at a fresh directory before the workers start, each worker
writes its samples there, and `/metrics` adds them up (prometheus-client's multiprocess
mode), so a scrape sees the whole process group whichever worker answers it.
"""

from __future__ import annotations

import os
import time

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import logs

REQUESTS = Counter("itp_http_requests_total", "HTTP requests answered.",
                   ["route", "method", "status"])
LATENCY = Histogram("itp_http_request_duration_seconds", "Time to answer, by route.",
                    ["route", "method"],
                    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5,
                             5, 10))
PATIENTS = Counter("itp_patients_scored_total", "Patients given a prediction.")
EXPLANATIONS = Counter("itp_explanations_total", "Predictions returned with SHAP values.")
WARNINGS = Counter("itp_prediction_warnings_total", "Warnings attached to predictions.",
                   ["code"])
MODEL = Gauge("itp_model_info", "The model being served (1) and those it replaced (0).",
              ["name", "version", "sha256"], multiprocess_mode="max")
LOADS = Counter("itp_model_loads_total", "Model loads and reloads, by outcome.", ["outcome"])

CONTENT_TYPE = CONTENT_TYPE_LATEST


def exposition() -> bytes:
    """The text format of every metric, across workers when there are several."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)
    return generate_latest(REGISTRY)


def served(name: str, version: str | None, digest: str,
           previous: tuple[str, str | None, str] | None) -> None:
    if previous is not None:
        MODEL.labels(previous[0], str(previous[1]), previous[2][:12]).set(0)
    MODEL.labels(name, str(version), digest[:12]).set(1)


class RequestMetrics:
    """Counts and times every request by its route template (never the raw path, which a
    client controls), method (from a fixed set) and status, as the access log names them."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def recording(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording)
        finally:
            path, method = logs.route_of(scope), logs.method_of(scope)
            REQUESTS.labels(path, method, str(status)).inc()
            LATENCY.labels(path, method).observe(time.perf_counter() - started)
