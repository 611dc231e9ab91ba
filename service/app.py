"""FastAPI app: predictions of ITP treatment response with SHAP explanations.

`create_app(settings)` builds the app; the module-level `app` is built from the environment,
so `uvicorn service.app:app` works as is. Request bodies and patient ids are never logged.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, HTTPException, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from service.model import LoadedModel, load_model
from service.schemas import (
    ModelInfo,
    PredictRequest,
    PredictResponse,
    ValidationErrorResponse,
    ValidationProblem,
)
from service.settings import Settings

log = logging.getLogger("service")


class ModelSlot:
    """Holds the serving model; a reload swaps it only once the new one is fully loaded."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.model: LoadedModel | None = None
        self.error: str | None = None
        self._lock = threading.Lock()

    def load(self) -> LoadedModel:
        with self._lock:
            try:
                model = load_model(self.settings)
            except Exception as error:
                self.error = f"{type(error).__name__}: {error}"
                log.error("model load from %s failed, %s: %s", self.settings.model_uri,
                          "keeping the current model" if self.model else "not ready", self.error)
                raise
            self.model, self.error = model, None
            log.info("serving %s version %s (sha256 %s...)", model.stored.name,
                     model.stored.version, model.stored.digest[:12])
            return model


def get_slot(request: Request) -> ModelSlot:
    return request.app.state.slot


def get_model(slot: Annotated[ModelSlot, Depends(get_slot)]) -> LoadedModel:
    if slot.model is None:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE,
                            detail=f"no model loaded: {slot.error or 'loading'}")
    return slot.model


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


SlotDep = Annotated[ModelSlot, Depends(get_slot)]
ModelDep = Annotated[LoadedModel, Depends(get_model)]
SettingsDep = Annotated[Settings, Depends(get_settings)]


def _configure_logging(level: str) -> None:
    """uvicorn configures only its own loggers; give ours a handler once."""
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(name)s: %(message)s"))
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(level.upper())


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    _configure_logging(settings.log_level)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # A failure is logged by the slot; /ready answers 503 until a reload succeeds.
        with contextlib.suppress(Exception):
            app.state.slot.load()
        yield

    app = FastAPI(
        title="ITP treatment response",
        version="0.1.0",
        summary="Probability that a patient with immune thrombocytopenia responds to a "
                "treatment, from gut microbiome and clinical data, with SHAP explanations.",
        description="Research tool, not a medical device. Response is defined by the IWG "
                    "criteria (Rodeghiero 2009) as configured at training; see GET /v1/model.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.slot = ModelSlot(settings)
    app.add_exception_handler(RequestValidationError, _validation_error)

    @app.get("/health", tags=["operations"], summary="Process is alive")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready", tags=["operations"], summary="A model is loaded and serving",
             responses={503: {"description": "No model loaded"}})
    def ready(slot: SlotDep) -> JSONResponse:
        if slot.model is None:
            return JSONResponse({"status": "not ready", "error": slot.error}, status_code=503)
        return JSONResponse({"status": "ready", "model": slot.model.ref.model_dump()})

    @app.get("/v1/model", tags=["model"], response_model=ModelInfo,
             summary="The served model: version, run, CV metrics, feature schema")
    def model_info(model: ModelDep) -> ModelInfo:
        return model.info()

    @app.post("/v1/predict", tags=["model"], response_model=PredictResponse,
              summary="Predict response for one or more patients",
              responses={422: {"model": ValidationErrorResponse,
                               "description": "Invalid input; names the patient and field"},
                         503: {"description": "No model loaded"}})
    def predict(request: PredictRequest, model: ModelDep,
                config: SettingsDep) -> PredictResponse:
        if len(request.patients) > config.max_batch:
            raise _unprocessable(None, "patients",
                                 f"at most {config.max_batch} patients per request")
        for patient in request.patients:
            if patient.treatment not in model.treatments:
                raise _unprocessable(patient.patient_id, "treatment",
                                     f"the model was not trained on {patient.treatment!r}; "
                                     f"it knows {model.treatments}")
        threshold = config.threshold if config.threshold is not None else model.threshold
        predictions = model.predict(request.patients, request.explain, request.top_k,
                                    threshold)
        return PredictResponse(model=model.ref, threshold=threshold, predictions=predictions)

    @app.post("/v1/model/reload", tags=["operations"], response_model=ModelInfo,
              summary="Reload the configured model (admin token required)",
              responses={403: {"description": "Bad or missing token, or reload disabled"},
                         500: {"description": "Load failed; the previous model keeps serving"}})
    def reload(slot: SlotDep, config: SettingsDep,
               authorization: Annotated[str | None, Header()] = None) -> ModelInfo:
        token = config.admin_token.get_secret_value() if config.admin_token else None
        supplied = (authorization or "").removeprefix("Bearer ")
        if not token or not secrets.compare_digest(supplied.encode(), token.encode()):
            raise HTTPException(status.HTTP_403_FORBIDDEN, detail="reload not permitted")
        try:
            return slot.load().info()
        except Exception as error:
            raise HTTPException(status.HTTP_500_INTERNAL_SERVER_ERROR,
                                detail=f"reload failed, previous model still serving: "
                                       f"{slot.error}") from error

    return app


def _unprocessable(patient_id: str | None, field: str, message: str) -> HTTPException:
    problem = ValidationProblem(patient_id=patient_id, field=field, message=message)
    return HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=[problem.model_dump()])


async def _validation_error(request: Request, error: Exception) -> JSONResponse:
    """Name the patient (by patient_id, not list index) and the field of each problem."""
    assert isinstance(error, RequestValidationError)
    body: Any = error.body
    patients = body.get("patients") if isinstance(body, dict) else None
    problems = []
    for item in error.errors():
        loc = [str(part) for part in item["loc"] if part != "body"]
        patient_id = None
        if len(loc) >= 2 and loc[0] == "patients" and loc[1].isdigit():
            patient_id = _patient_id(patients, int(loc[1]))
            loc = loc[2:]
        problems.append(ValidationProblem(patient_id=patient_id, field=".".join(loc) or "body",
                                          message=item["msg"]))
    return JSONResponse({"detail": [p.model_dump() for p in problems]},
                        status_code=status.HTTP_422_UNPROCESSABLE_CONTENT)


def _patient_id(patients: Any, index: int) -> str | None:
    """The caller's id of the index-th patient, as sent (it may itself be the invalid part)."""
    if not isinstance(patients, list) or index >= len(patients):
        return None
    patient = patients[index]
    value = patient.get("patient_id") if isinstance(patient, dict) else None
    return None if value is None else str(value)


app = create_app()
