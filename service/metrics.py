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
WEBHOOKS = Counter("itp_webhook_deliveries_total", "Webhook deliveries, by outcome (accepted, "
                   "ignored, refused_400, refused_401, refused_413).", ["outcome"])

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


def observe(route: str, method: str, status: int, seconds: float) -> None:
    """Count and time one request by route template (never the raw path, which a client
    controls), method (from a fixed set) and status, as its access record names them
    (499: the client went away). Called by `logs.AccessLog`, the one middleware that sees
    every response."""
    REQUESTS.labels(route, method, str(status)).inc()
    LATENCY.labels(route, method).observe(seconds)
