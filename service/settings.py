"""Service settings, all from the environment (12-factor): no secrets in code or files."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

MIB = 1024 * 1024
MIN_WEBHOOK_SECRET = 32  # characters: an HMAC key anyone could guess authenticates nothing
LogFormat = Literal["json", "text"]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ITP_", extra="ignore", populate_by_name=True)

    model_uri: str = Field(
        "models:/itp-response@champion",
        description="models:/<name>@<alias>, models:/<name>/<version>, or a local bundle path.",
    )
    model_sha256: str | None = Field(
        None, description="Optional pin: refuse any model whose files have another digest."
    )
    bundle_public_key: Path | None = Field(
        None, description="PEM Ed25519 public key: bundles must carry a valid signature "
                          "(bundle.sig, from `itp-train export --sign-key`); unsigned ones are "
                          "refused.")
    tracking_uri: str | None = Field(
        None,
        validation_alias=AliasChoices("MLFLOW_TRACKING_URI", "ITP_TRACKING_URI"),
        description="MLflow tracking/registry store, for models:/ URIs.",
    )
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    workers: int = Field(1, ge=1, le=64, description="uvicorn worker processes; each scores "
                         "with one OpenMP/BLAS thread, so workers never oversubscribe cores.")
    log_level: str = "info"
    threshold: float | None = Field(None, gt=0, lt=1, description="Probability at or above "
                                    "which the label is 'responder'; default: the threshold "
                                    "the model chose in training.")
    max_batch: int = Field(1000, ge=1, le=100_000,
                           description="Most patients accepted in one request.")
    max_taxa: int = Field(5000, ge=1, le=1_000_000,
                          description="Most taxa in one patient's profile.")
    max_key_length: int = Field(1000, ge=16, le=100_000,
                                description="Longest taxon lineage string, in characters.")
    max_body_bytes: int = Field(32 * MIB, ge=1024, description="Largest request body, in "
                                "bytes; larger ones get 413 before anything is parsed.")
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list, description="Comma-separated API keys accepted on /v1/* "
        "(Authorization: Bearer or X-API-Key); several allow rotation. None: open, with a "
        "loud warning at start-up.")
    api_keys_file: Path | None = Field(
        None, description="File with one API key per line (a mounted secret), added to "
                          "ITP_API_KEYS.")
    admin_token: SecretStr | None = Field(
        None, validation_alias=AliasChoices("ITP_ADMIN_KEY", "ITP_ADMIN_TOKEN"),
        description="Key for POST /v1/model/reload, apart from the API keys; reload is off "
                    "when unset.")
    poll_seconds: float = Field(
        30.0, ge=0, description="For models:/<name>@<alias>: how often to ask the registry "
                                "where the alias points, in seconds (at least 1); 0 turns "
                                "polling off.")
    webhook_secret: SecretStr | None = Field(
        None, description="Shared secret of MLflow's registry webhook, at least "
                          f"{MIN_WEBHOOK_SECRET} characters: POST /v1/webhooks/mlflow accepts "
                          "only deliveries whose X-MLflow-Signature (HMAC-SHA256) it verifies; "
                          "the endpoint is off when unset, and a shorter (or empty) secret "
                          "stops the service from starting.")
    webhook_max_age_seconds: int = Field(
        300, ge=1, description="Webhook deliveries whose X-MLflow-Timestamp is older (or "
                               "further in the future) than this are refused as replays.")
    log_format: LogFormat = Field(
        "json", description="json: one JSON object per line (request id, route, status, "
                            "latency, model version; never a payload); text: for a terminal.")
    shutdown_grace_seconds: float = Field(
        20.0, ge=0, description="On SIGTERM the service stops accepting connections and "
                                "lets requests in flight finish for up to this long before "
                                "cancelling them; keep it below the orchestrator's kill "
                                "timeout (Kubernetes: terminationGracePeriodSeconds, 30 s).")
    load_retry_max_seconds: float = Field(
        60.0, gt=0, description="Longest wait between attempts to load the model at start-up "
                                "(exponential backoff from 1 s).")

    @field_validator("poll_seconds")
    @classmethod
    def _poll_off_or_sensible(cls, value: float) -> float:
        """0 is off; a sub-second poll would ask the registry many times a second."""
        if 0 < value < 1:
            raise ValueError("ITP_POLL_SECONDS is 0 (off) or at least 1 second")
        return value

    @field_validator("webhook_secret")
    @classmethod
    def _long_secret(cls, value: SecretStr | None) -> SecretStr | None:
        """An empty or short secret is an HMAC key anyone can sign with or guess."""
        if value is not None and len(value.get_secret_value()) < MIN_WEBHOOK_SECRET:
            raise ValueError(f"ITP_WEBHOOK_SECRET must be at least {MIN_WEBHOOK_SECRET} "
                             "characters (e.g. `openssl rand -hex 24`); unset it to turn the "
                             "webhook off")
        return value

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return [key.strip() for key in value.split(",") if key.strip()]
        return value

    def keys(self) -> list[bytes]:
        """Every accepted API key, from the environment and the secrets file."""
        keys = [k.get_secret_value() for k in self.api_keys]
        if self.api_keys_file is not None:
            lines = [line.strip() for line in self.api_keys_file.read_text().splitlines()]
            from_file = [line for line in lines if line and not line.startswith("#")]
            if not from_file:  # a secret not mounted yet must not open the service
                raise ValueError(f"ITP_API_KEYS_FILE {self.api_keys_file} holds no key")
            keys += from_file
        return [k.encode() for k in keys]
