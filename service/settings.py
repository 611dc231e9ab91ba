"""Service settings, all from the environment (12-factor): no secrets in code or files."""

from __future__ import annotations

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ITP_", extra="ignore")

    model_uri: str = Field(
        "models:/itp-response@champion",
        description="models:/<name>@<alias>, models:/<name>/<version>, or a local bundle path.",
    )
    model_sha256: str | None = Field(
        None, description="Optional pin: refuse any model whose files have another digest."
    )
    tracking_uri: str | None = Field(
        None,
        validation_alias=AliasChoices("MLFLOW_TRACKING_URI", "ITP_TRACKING_URI"),
        description="MLflow tracking/registry store, for models:/ URIs.",
    )
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    log_level: str = "info"
    threshold: float | None = Field(None, gt=0, lt=1, description="Probability at or above "
                                    "which the label is 'responder'; default: the threshold "
                                    "the model chose in training.")
    max_batch: int = Field(512, ge=1, description="Most patients accepted in one request.")
    admin_token: SecretStr | None = Field(
        None, description="Bearer token for POST /v1/model/reload; reload is off when unset."
    )
