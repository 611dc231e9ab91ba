"""FastAPI app: predictions of ITP treatment response with SHAP explanations.

`create_app(settings)` builds the app; the module attribute `app` is built from the
environment on first use, so `uvicorn service.app:app` works as is. Request bodies and
patient ids are never logged; each request gets one access record and an X-Request-ID, and
every /v1/* response past the key check names the model that answered in X-Model-* headers
(service/logs.py).

A request's path: size limit (413, before anything is read into memory) -> API key (401) ->
content type (415) -> JSON parsing and schema validation off the event loop (400, 422) ->
model checks (422) -> scoring and explanation off the event loop. `/health` and `/ready`
need no key and never wait for the model.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import errors, loading, logs, metrics, webhook
from service.auth import AdminKey, ApiKey
from service.loading import ModelSlot
from service.schemas import (
    ErrorResponse,
    Limits,
    ModelInfo,
    PredictResponse,
    ValidationErrorResponse,
    WebhookAnswer,
    request_models,
)
from service.settings import Settings

if TYPE_CHECKING:  # imported by the loader thread, after the server listens
    from service.model import LoadedModel

log = logging.getLogger("service")


def get_slot(request: Request) -> ModelSlot:
    return request.app.state.slot


def get_model(slot: Annotated[ModelSlot, Depends(get_slot)]) -> LoadedModel:
    model = slot.model  # one read: a load may swap it meanwhile
    if model is None:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, detail=NOT_LOADED)
    logs.took(model)  # headers and access log name this model, whatever loads meanwhile
    return model


NOT_LOADED = ("no model loaded yet; GET /ready says when it is, GET /v1/model (with a key) "
              "why not")


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


SlotDep = Annotated[ModelSlot, Depends(get_slot)]
ModelDep = Annotated[Any, Depends(get_model)]  # a LoadedModel (not imported at start-up)
SettingsDep = Annotated[Settings, Depends(get_settings)]

PROBLEM = {"model": ValidationErrorResponse}
PREDICT_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {**PROBLEM, "description": "Not JSON; the message gives line and column"},
    401: {"model": ErrorResponse, "description": "Missing or invalid API key"},
    413: {**PROBLEM, "description": "Body larger than ITP_MAX_BODY_BYTES"},
    415: {**PROBLEM, "description": "Content-Type is not application/json"},
    422: {**PROBLEM, "description": "Invalid input: names the patient (index, id) and the "
          "field, never the value"},
    503: {"model": ErrorResponse, "description": "No model loaded yet"},
}


class BodyLimit:
    """413 for bodies over `limit` bytes, by Content-Length or while streaming, before the
    app reads them into memory."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            await self._refuse(send)
            return
        received = 0
        started = False

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise _TooLarge
            return message

        async def tracking(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited, tracking)
        except _TooLarge:
            if not started:
                await self._refuse(send)

    async def _refuse(self, send: Send) -> None:
        response = errors.ClientError(status.HTTP_413_CONTENT_TOO_LARGE, [errors.problem(
            f"the request body is larger than {self.limit} bytes (ITP_MAX_BODY_BYTES); "
            "send fewer patients per request")]).response()
        await response({"type": "http"}, _no_receive, send)


class _TooLarge(Exception):
    pass


async def _no_receive() -> Message:  # pragma: no cover - a response never reads
    return {"type": "http.disconnect"}


def create_app(settings: Settings | None = None, slot: ModelSlot | None = None) -> FastAPI:
    settings = settings or Settings()
    logs.configure(settings.log_level, settings.log_format)
    limits = Limits(settings.max_batch, settings.max_taxa, settings.max_key_length)
    _, _, predict_request = request_models(limits)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.slot.start()
        yield
        app.state.slot.stop()

    app = FastAPI(
        title="ITP treatment response",
        version="0.2.0",
        summary="Probability that a patient with immune thrombocytopenia responds to a "
                "treatment, from gut microbiome and clinical data, with SHAP explanations.",
        description="Research tool, not a medical device. Response is defined by the IWG "
                    "criteria (Rodeghiero 2009) as configured at training; see GET /v1/model. "
                    "/v1/* need an API key when the service has any (ITP_API_KEYS).",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.slot = slot or ModelSlot(settings)
    app.state.api_keys = settings.keys()
    if not app.state.api_keys:
        log.warning("NO API KEYS ARE SET: /v1/* answer anyone who can reach this port. Set "
                    "ITP_API_KEYS or ITP_API_KEYS_FILE before serving patient data.")
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    # outermost: every response gets a request id, one access record and its metrics
    # (413s from the limit included)
    app.add_middleware(logs.AccessLog, observe=metrics.observe)
    app.add_exception_handler(errors.ClientError, _client_error)
    app.add_exception_handler(RequestValidationError, _request_error)

    @app.get("/health", tags=["operations"], summary="Process is alive (liveness)")
    async def health() -> dict[str, str]:  # async: never queued behind scoring threads
        return {"status": "ok"}

    @app.get("/metrics", tags=["operations"], summary="Prometheus metrics (no key needed: "
             "counts and timings only, never patient data)",
             response_class=Response, responses={200: {"content": {"text/plain": {}}}})
    def prometheus() -> Response:
        return Response(metrics.exposition(), media_type=metrics.CONTENT_TYPE)

    @app.get("/ready", tags=["operations"], summary="A model is loaded and serving (readiness)",
             description="Public, so coarse: ready or not, a short reason code and the "
                         "model's name and version. The full reasons (which may name the "
                         "registry, hosts or paths), checks and alias state are in "
                         "GET /v1/model, behind the API key.",
             responses={503: {"description": "No model loaded yet, and a reason code"}})
    async def ready(slot: SlotDep) -> JSONResponse:
        model, failure = slot.model, slot.public_failure()
        if model is None:
            return JSONResponse({"status": "not ready", "reason": failure["error"] if failure
                                 else "loading", "last_failure": failure}, status_code=503)
        ref = model.ref
        return JSONResponse({"status": "ready", "reason": "serving",
                             "model": {"name": ref.name, "version": ref.version,
                                       "alias": ref.alias},
                             "last_reload_failure": failure})

    @app.get("/v1/model", tags=["model"], response_model=ModelInfo,
             summary="The served model: version, run, CV metrics, feature schema, checks, "
                     "the alias followed and the last failed load",
             responses={401: PREDICT_RESPONSES[401],
                        503: {"description": "No model loaded yet: `detail`, and "
                              "`last_failure` and `follow` say why"}},
             dependencies=[ApiKey])
    def model_info(slot: SlotDep) -> Any:
        model = slot.model  # one read, as get_model; here a 503 says why, to a key holder
        if model is None:
            return JSONResponse({"detail": NOT_LOADED, "last_failure": slot.failure(),
                                 "follow": slot.following()}, status_code=503)
        logs.took(model)
        return model.info(last_reload_failure=slot.failure(), follow=slot.following())

    @app.post("/v1/predict", tags=["model"], response_model=PredictResponse,
              summary="Predict response for one or more patients",
              responses=PREDICT_RESPONSES, dependencies=[ApiKey],
              openapi_extra={"requestBody": {"required": True, "content": {
                  "application/json": {"schema": {
                      "$ref": "#/components/schemas/PredictRequest"}}}}})
    async def predict(request: Request, model: ModelDep, config: SettingsDep) -> Response:
        media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media_type != "application/json":
            raise errors.ClientError(status.HTTP_415_UNSUPPORTED_MEDIA_TYPE, [errors.problem(
                "send the request as JSON with Content-Type: application/json")])
        body = await request.body()
        return await run_in_threadpool(_predict, body, predict_request, model, config)

    @app.post("/v1/model/reload", tags=["operations"], response_model=ModelInfo,
              summary="Reload the configured model (admin key required)",
              responses={401: {"model": ErrorResponse, "description": "Missing or invalid "
                               "admin key"},
                         403: {"model": ErrorResponse, "description": "Reload disabled: no "
                               "ITP_ADMIN_KEY set"},
                         503: {"model": ErrorResponse, "description": "Load failed; the "
                               "previous model keeps serving"}}, dependencies=[AdminKey])
    def reload(slot: SlotDep) -> ModelInfo:
        try:
            model = slot.load()
        except Exception as error:
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE,
                                detail=f"reload failed, previous model still serving: "
                                       f"{loading.describe(error)}") from error
        logs.took(model)  # an admin, authenticated: named in the headers like any /v1 answer
        return model.info()

    if settings.webhook_secret is not None:  # off (404) without a secret
        _webhook_route(app, settings)

    app.openapi = lambda: _openapi(app, predict_request)  # type: ignore[method-assign]
    return app


def _webhook_route(app: FastAPI, settings: Settings) -> None:
    """POST /v1/webhooks/mlflow: MLflow's registry webhook (service/webhook.py)."""
    assert settings.webhook_secret is not None
    secret = settings.webhook_secret.get_secret_value().encode()
    replays = webhook.Replays()
    ignored = {"model": WebhookAnswer, "description": "Verified, nothing to do (the reason "
               "says why: another event, model or alias, or a repeated delivery)"}

    @app.post("/v1/webhooks/mlflow", tags=["operations"], response_model=WebhookAnswer,
              status_code=status.HTTP_202_ACCEPTED,
              summary="MLflow registry webhook: the followed alias moved",
              description="For MLflow's `model_version_alias.created` event. Needs no API "
                          "key: the delivery's HMAC-SHA256 signature (`X-MLflow-Signature`, "
                          "with the shared ITP_WEBHOOK_SECRET, over `X-MLflow-Delivery-Id`, "
                          "`X-MLflow-Timestamp` and the body) is its authentication, and a "
                          "timestamp more than ITP_WEBHOOK_MAX_AGE_SECONDS away is refused. "
                          "A delivery for the served name and alias makes the service ask "
                          "the registry where the alias points and, if it moved, load and "
                          "check that version in the background (never in this request); "
                          "the payload never chooses what is loaded.",
              responses={200: ignored,
                         400: {"model": ErrorResponse, "description": "Malformed headers "
                               "or payload"},
                         401: {"model": ErrorResponse, "description": "Missing or invalid "
                               "signature, or a timestamp out of the window"},
                         413: {"model": ErrorResponse, "description": "Body over 64 KiB"}})
    async def mlflow_webhook(request: Request, slot: SlotDep) -> JSONResponse:
        try:
            body = await _read_at_most(request, webhook.MAX_BODY)
            delivery = webhook.verify(secret, request.headers, body,
                                      settings.webhook_max_age_seconds)
        except webhook.Refused as refused:
            # anyone can post here: INFO and a counter, not a WARNING line per attempt
            metrics.WEBHOOKS.labels(f"refused_{refused.status}").inc()
            log.info("webhook delivery refused (%s): %s", refused.status, refused.reason)
            return JSONResponse({"detail": refused.reason}, status_code=refused.status)
        followed = loading.alias_of(settings.model_uri) if slot.follows else None
        reason = webhook.ignored_because(delivery, followed, replays)
        if reason is not None:
            metrics.WEBHOOKS.labels("ignored").inc()
            return JSONResponse({"status": "ignored", "reason": reason})
        metrics.WEBHOOKS.labels("accepted").inc()
        slot.wake()
        log.info("webhook: %s@%s moved; asking the registry", *followed)
        return JSONResponse({"status": "accepted", "reason": "checking the registry"},
                            status_code=status.HTTP_202_ACCEPTED)


async def _read_at_most(request: Request, limit: int) -> bytes:
    """The body, read only up to `limit` bytes: a larger one is refused (413) without
    reading the rest (the app-wide limit, ITP_MAX_BODY_BYTES, is far larger)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise webhook.Refused(413, f"body over {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise webhook.Refused(413, f"body over {limit} bytes")
    return bytes(body)


def _predict(body: bytes, predict_request: type, model: LoadedModel,
             config: Settings) -> Response:
    """Parse, check and score: CPU work, run in a worker thread."""
    request = errors.parse(predict_request, body)
    problems = []
    first: dict[str, int] = {}
    for index, patient in enumerate(request.patients):
        if patient.patient_id in first:
            problems.append(errors.problem(
                f"patient_id repeats that of patient {first[patient.patient_id]}; ids must be "
                "unique in a request", "patient_id", index, patient.patient_id))
        first.setdefault(patient.patient_id, index)
        if patient.treatment not in model.treatments:
            problems.append(errors.problem(
                f"the model was not trained on this treatment; it knows "
                f"{', '.join(model.treatments)}", "treatment", index, patient.patient_id))
    if problems:
        raise errors.ClientError(status.HTTP_422_UNPROCESSABLE_CONTENT,
                                 problems[:errors.MAX_PROBLEMS],
                                 max(0, len(problems) - errors.MAX_PROBLEMS))
    threshold = config.threshold if config.threshold is not None else model.threshold
    predictions = model.predict(request.patients, request.explain, request.top_k, threshold)
    metrics.PATIENTS.inc(len(predictions))
    logs.scored(len(predictions))
    if request.explain:
        metrics.EXPLANATIONS.inc(len(predictions))
    for prediction in predictions:
        for warning in prediction.warnings:
            metrics.WARNINGS.labels(warning.code).inc()
    response = PredictResponse(model=model.ref, threshold=threshold, predictions=predictions)
    return Response(response.model_dump_json(), media_type="application/json")


def _openapi(app: FastAPI, predict_request: type) -> dict[str, Any]:
    """FastAPI's schema plus the request model it does not see (the body is parsed off the
    event loop, not by FastAPI), with its nested models, as components."""
    if app.openapi_schema:
        return app.openapi_schema
    spec = get_openapi(title=app.title, version=app.version, summary=app.summary,
                       description=app.description, routes=app.routes)
    request_schema = predict_request.model_json_schema(
        ref_template="#/components/schemas/{model}")
    components = spec.setdefault("components", {}).setdefault("schemas", {})
    components.update(request_schema.pop("$defs", {}))
    components["PredictRequest"] = request_schema
    if not app.state.api_keys:  # an open service documents no credentials it would ignore
        for path, item in spec["paths"].items():
            for operation in item.values():
                if path != "/v1/model/reload":
                    operation.pop("security", None)
                    operation.get("responses", {}).pop("401", None)
        if app.state.settings.admin_token is None:
            spec["components"].pop("securitySchemes", None)
    app.openapi_schema = spec
    return spec


async def _client_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, errors.ClientError)
    return error.response()


async def _request_error(request: Request, error: Exception) -> JSONResponse:
    """FastAPI's own validation (query, headers): the path of each problem, never values."""
    assert isinstance(error, RequestValidationError)
    problems = [errors.problem(item["msg"], ".".join(str(p) for p in item["loc"]))
                for item in error.errors()[:errors.MAX_PROBLEMS]]
    return errors.ClientError(status.HTTP_422_UNPROCESSABLE_CONTENT, problems).response()


def __getattr__(name: str) -> FastAPI:
    """`service.app:app` for uvicorn's workers: built from the environment on first use."""
    if name == "app":
        globals()["app"] = application = create_app()
        return application
    raise AttributeError(name)
