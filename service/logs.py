"""Structured logs: one JSON object per line (`ITP_LOG_FORMAT=json`, for a log pipeline) or
plain text for a terminal, and exactly one access record per request.

What a record may carry is decided here, not at each call site. A record holds its time,
level, logger, message, the request id when it is written during a request, and only the
fields a caller names in `extra={"fields": ...}` (so no library's stray attribute slips
in). The access record holds the request id, method, route template, status, latency, the
model that answered and how many patients it scored; never a body, a query string, a
header other than X-Request-ID, a patient id, nor the client's address (an address can
point to a patient's home or ward; the load balancer keeps it where that is needed). In
JSON, an exception is logged with its type and stack but not its message, which may quote
the input (pydantic's messages do).

The service takes over the process's logging: every record (its own, uvicorn's, MLflow's,
Python warnings) goes through one handler on the root logger, and uvicorn's own access log
is off, since `AccessLog` writes the one access line with what uvicorn cannot know.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
import traceback
import uuid
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from starlette.datastructures import MutableHeaders
from starlette.requests import ClientDisconnect
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.settings import LogFormat as Format

access_log = logging.getLogger("service.access")

REQUEST_ID = re.compile(rb"[A-Za-z0-9._-]{1,64}")  # anything else is replaced, never logged
METHODS = frozenset({"GET", "POST", "HEAD", "OPTIONS"})  # a method is a client's free token
CLIENT_CLOSED = 499  # nginx's code: the client went away before the answer; nothing is sent
Observer = Callable[[str, str, int, float], None]  # route, method, status, seconds


@dataclass
class RequestContext:
    """What one request learns on its way, read by the access record and response headers.

    Mutated in place, so worker threads (which run in a copy of the request's context)
    write to the same object."""

    request_id: str
    # the LoadedModel this request took through the authenticated dependency (get_model,
    # after the key check): the one that scored it, and the only one its headers name
    model: Any = None
    patients: int | None = None


_current: ContextVar[RequestContext | None] = ContextVar("itp_request", default=None)


def current() -> RequestContext | None:
    return _current.get()


def took(model: Any) -> None:
    """Record the model a request took, so its headers and access record name the model
    that scored it even if a reload swaps the slot before the response is sent."""
    context = _current.get()
    if context is not None:
        context.model = model


def scored(patients: int) -> None:
    context = _current.get()
    if context is not None:
        context.patients = patients


def request_id(scope: Scope) -> str:
    """The caller's X-Request-ID if it is a short plain token (to follow one request across
    proxies), else a fresh uuid4: a free-text value never reaches the logs."""
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id" and REQUEST_ID.fullmatch(value):
            return value.decode("ascii")
    return uuid.uuid4().hex


def route_of(scope: Scope) -> str:
    """The route template (`/v1/predict`), never the raw path a client chose. A response sent
    before routing (413 by the body limit) is matched against the app's routes here."""
    route = scope.get("route")
    if route is None:
        router = getattr(scope.get("app"), "router", None)
        for candidate in getattr(router, "routes", ()):
            if candidate.matches(scope)[0] is Match.FULL:
                route = candidate
                break
    return getattr(route, "path", "unmatched")


def method_of(scope: Scope) -> str:
    return scope["method"] if scope["method"] in METHODS else "OTHER"


def model_headers(model: Any) -> dict[str, str]:
    """X-Model-Name, -Version, -Alias: which model answered, for clients and proxies that
    log headers but not bodies (a version or alias the model has not is left out)."""
    named = {"x-model-name": model.stored.name, "x-model-version": model.stored.version,
             "x-model-alias": model.alias}
    return {header: str(value) for header, value in named.items() if value is not None}


class AccessLog:
    """One access record per request, its metrics (through `observe`), and the
    X-Request-ID and X-Model-* response headers.

    Pure ASGI (no BaseHTTPMiddleware), outermost of ours: its latency includes the body
    limit, and its headers reach every response of ours, 413s and 500s included. A response
    names a model only if the request took one through the authenticated dependency
    (`took`): a caller without a key (a 401, a 413 from the body limit, which runs before
    the key check, a 405, a webhook's 400) learns nothing about what serves."""

    def __init__(self, app: ASGIApp, observe: Observer | None = None) -> None:
        self.app = app
        self.observe = observe

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        context = RequestContext(request_id(scope))
        token = _current.set(context)
        status: int | None = None

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                message.setdefault("headers", [])
                headers = MutableHeaders(scope=message)
                headers["x-request-id"] = context.request_id
                if context.model is not None:
                    headers.update(model_headers(context.model))
            await send(message)

        error: BaseException | None = None
        try:
            await self.app(scope, receive, sending)
        except ClientDisconnect:  # gone mid-upload: nothing to answer, nothing went wrong
            status = CLIENT_CLOSED
        except Exception as caught:
            error = caught
            if status is None:  # the client still gets a request id to quote
                await _internal_error(sending)
            raise
        finally:
            answered = status or 500
            elapsed = time.perf_counter() - started
            method, route = method_of(scope), route_of(scope)  # once: may scan the routes
            self._record(method, route, context, answered, elapsed, error)
            if self.observe is not None:
                self.observe(route, method, answered, elapsed)
            _current.reset(token)

    @staticmethod
    def _record(method: str, route: str, context: RequestContext, status: int,
                elapsed: float, error: BaseException | None) -> None:
        model = context.model
        fields: dict[str, Any] = {"method": method, "route": route, "status": status,
                                  "latency_ms": round(1000 * elapsed, 2)}
        if model is not None:
            fields |= {"model_name": model.stored.name, "model_version": model.stored.version,
                       "model_alias": model.alias}
        if context.patients is not None:
            fields["patients"] = context.patients
        level = logging.ERROR if error else logging.WARNING if status >= 500 else logging.INFO
        access_log.log(level, "%s %s %d", method, route, status, extra={"fields": fields},
                       exc_info=(type(error), error, error.__traceback__) if error else None)


async def _internal_error(send: Send) -> None:
    body = b'{"detail":"internal error; quote the X-Request-ID header when reporting it"}'
    await send({"type": "http.response.start", "status": 500,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    """The request id (during a request) and the fields the caller named; nothing else."""
    context = _current.get()
    fields: dict[str, Any] = {"request_id": context.request_id} if context else {}
    named = getattr(record, "fields", None)
    return fields | named if isinstance(named, dict) else fields


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (json.dumps escapes newlines)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "timestamp": datetime.fromtimestamp(record.created, UTC).isoformat(
                timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        } | _fields(record)
        if record.exc_info and record.exc_info[0] is not None:
            kind, _, stack = record.exc_info
            entry["error"] = {"type": f"{kind.__module__}.{kind.__qualname__}",
                              "stack": "".join(traceback.format_tb(stack))}
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    """For a terminal: time, level, logger, message, then the fields as key=value."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        return super().formatMessage(record) + "".join(
            f" {key}={value}" for key, value in _fields(record).items())


def formatter(log_format: Format) -> logging.Formatter:
    return JsonFormatter() if log_format == "json" else TextFormatter()


class _Stderr(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever sys.stderr is at the time (a test runner swaps it)."""

    itp = True  # ours: a reconfiguration replaces it instead of adding a second

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def handler(log_format: Format = "json") -> logging.Handler:
    """The process's one log handler, on stderr as containers expect."""
    stream = _Stderr()
    stream.setFormatter(formatter(log_format))
    return stream


def configure(level: str, log_format: Format) -> None:
    """Route every logger to one handler on the root logger, in `log_format`; idempotent.

    Handlers others added (pytest's caplog) stay; uvicorn's default console handlers are
    replaced, and its access log is turned off in favour of `AccessLog`."""
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "itp", False)]:
        root.removeHandler(old)
    root.addHandler(handler(log_format))
    root.setLevel(level.upper())
    for name in ("service", "uvicorn", "uvicorn.error", "py.warnings"):
        logger = logging.getLogger(name)
        logger.handlers = [h for h in logger.handlers if not _uvicorn_console(h)]
        logger.propagate = True
    logging.getLogger("service").setLevel(level.upper())
    access = logging.getLogger("uvicorn.access")
    access.handlers, access.propagate = [], False  # uvicorn checks hasHandlers() per connection
    logging.captureWarnings(True)
    # MLflow, imported later by the loader thread, would give its loggers a text handler of
    # its own; this keeps them on ours. Its registry store's migrations chatter at INFO.
    os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")
    logging.getLogger("alembic").setLevel(logging.WARNING)


def _uvicorn_console(handler: logging.Handler) -> bool:
    return type(handler.formatter).__module__.startswith("uvicorn") or getattr(
        handler, "itp", False)


def uvicorn_config(level: str, log_format: Format) -> dict[str, Any]:
    """`log_config` for uvicorn.run: the same setup, applied in every worker process before
    uvicorn logs anything."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "handlers": {"itp": {"()": "service.logs.handler", "log_format": log_format}},
        "root": {"handlers": ["itp"], "level": level.upper()},
        "loggers": {
            "uvicorn": {"handlers": [], "propagate": True},
            "uvicorn.access": {"handlers": [], "propagate": False},
        },
    }
