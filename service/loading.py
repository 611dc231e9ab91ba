"""The serving model's slot: loaded in the background, swapped only when a new one is whole.

The process answers `/health` from its first second whatever the registry does: the model
stack is imported and the first load runs in a thread, retried with exponential backoff,
and `/ready` says why it is not ready yet. A failed reload keeps the old model serving and
is reported until one succeeds.

Serving `models:/<name>@<alias>`, the slot follows the alias: a thread asks the registry
where the alias points every `ITP_POLL_SECONDS` (and whenever MLflow's webhook says it moved,
`wake`), and when it names another version, loads that one, runs `service.checks` on it and
swaps it in with one reference assignment. Requests keep the model object they took, so
in-flight ones finish on the old model; a model that fails a check never serves.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from service import metrics
from service.settings import Settings

if TYPE_CHECKING:  # the model stack (mlflow, scikit-learn, xgboost) loads in the thread
    from service.model import LoadedModel

log = logging.getLogger("service")


CREDENTIALS = re.compile(r"(\w+://)[^/@\s]+@")  # user:password@ in a tracking URI


def describe(error: Exception) -> str:
    """An error as reported by /ready and /v1/model: type and message, credentials cut."""
    return CREDENTIALS.sub(r"\1***@", f"{type(error).__name__}: {error}")


ALIAS_URI = re.compile(r"^models:/(?P<name>[^/@]+)@(?P<alias>[^/@]+)$")

Checker = Callable[["LoadedModel", "LoadedModel | None", Settings], dict[str, str]]


@dataclass(frozen=True)
class Failure:
    """The last failed load, replaced whole so that readers never see half an update."""

    error: str
    at: str
    attempts: int
    next_attempt: float | None = None  # monotonic time of the next retry, at start-up
    outcome: str = "failed"  # or "rejected": loaded, but a check refused it


@dataclass(frozen=True)
class Follow:
    """What following the alias last saw, replaced whole."""

    registry_version: str | None = None
    checked_at: str | None = None
    error: str | None = None  # the last registry question that failed


def alias_of(model_uri: str) -> tuple[str, str] | None:
    """(name, alias) of a models:/<name>@<alias> URI, else None."""
    match = ALIAS_URI.match(model_uri)
    return (match["name"], match["alias"]) if match else None


def registry_version(settings: Settings) -> str:
    """Where the alias points now: one cheap registry call, no download."""
    from mlflow import MlflowClient

    name, alias = alias_of(settings.model_uri) or ("", "")
    client = MlflowClient(tracking_uri=settings.tracking_uri)
    return str(client.get_model_version_by_alias(name, alias).version)


def check_candidate(candidate: LoadedModel, serving: LoadedModel | None,
                    settings: Settings) -> dict[str, str]:
    from service.checks import check

    return check(candidate, serving)


class ModelSlot:
    def __init__(self, settings: Settings,
                 loader: Callable[[Settings], LoadedModel] | None = None,
                 resolver: Callable[[Settings], str] | None = None,
                 checker: Checker | None = None) -> None:
        self.settings = settings
        self.loader = loader
        self.resolver = resolver or registry_version
        self.checker = checker or check_candidate
        self.model: LoadedModel | None = None
        self.last_failure: Failure | None = None
        self.rejected: tuple[str | None, str] | None = None  # (version, digest) refused
        self.followed = Follow()
        self.attempts = 0
        self._lock = threading.Lock()  # one load at a time; readers never take it
        self._stop = threading.Event()
        self._wake = threading.Event()

    @property
    def follows(self) -> bool:
        """Whether the slot follows a registry alias (by polling, the webhook or both)."""
        return alias_of(self.settings.model_uri) is not None and (
            self.settings.poll_seconds > 0 or self.settings.webhook_secret is not None)

    def start(self) -> None:
        """Load in the background until a model serves (or `stop`); then follow the alias."""
        threading.Thread(target=self._until_loaded, name="model-loader", daemon=True).start()
        if self.follows:
            threading.Thread(target=self._follow, name="alias-follower", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def wake(self) -> None:
        """Ask the registry now (the webhook said the alias moved); never loads in the
        caller's thread."""
        self._wake.set()

    def _follow(self) -> None:
        """Ask at every poll and wake-up; after a registry or load error, again with
        backoff, so that a webhook-only service does not wait for the next delivery."""
        poll = self.settings.poll_seconds or None  # None: wait for the webhook only
        timeout, delay = poll, 1.0
        while not self._stop.is_set():
            self._wake.wait(timeout)
            self._wake.clear()
            if self._stop.is_set():
                return
            if self.model is None:  # until the first load, _until_loaded is in charge
                continue
            if self.check_alias() == "failed":
                timeout = min(delay, poll or delay)
                delay = min(2 * delay, self.settings.load_retry_max_seconds)
            else:
                timeout, delay = poll, 1.0

    def check_alias(self) -> str:
        """Ask the registry where the alias points; load, check and swap if it moved.
        Returns unchanged, swapped, rejected (now or before) or failed (to ask or load)."""
        try:
            version = self.resolver(self.settings)
        except Exception as error:
            self.followed = replace(self.followed, error=describe(error), checked_at=_now())
            log.warning("asking the registry where %s points failed: %s",
                        self.settings.model_uri, self.followed.error)
            return "failed"
        self.followed = Follow(version, _now())
        serving = self.model
        if serving is None or version == serving.stored.version:
            return "unchanged"
        if self.rejected is not None and self.rejected[0] == version:
            return "rejected"  # refused already; a registry version's files never change
        log.info("%s now points at version %s (serving %s): loading it",
                 self.settings.model_uri, version, serving.stored.version)
        try:
            self.load()
        except Exception:  # recorded and reported by load(); the old model serves on
            failure = self.last_failure
            return failure.outcome if failure is not None else "failed"
        return "swapped"

    def following(self) -> dict[str, Any] | None:
        """The alias followed and what the registry last said, for /ready and /v1/model."""
        if not self.follows:
            return None
        followed = self.followed
        return {"uri": self.settings.model_uri,
                "poll_seconds": self.settings.poll_seconds or None,
                "webhook": self.settings.webhook_secret is not None,
                "registry_version": followed.registry_version,
                "checked_at": followed.checked_at, "error": followed.error}

    def _until_loaded(self) -> None:
        delay = 1.0
        while self.model is None and not self._stop.is_set():
            try:
                self.load()
                return
            except Exception:  # recorded by load(); retried
                failure = self.last_failure
                if failure is not None:
                    self.last_failure = replace(failure,
                                                next_attempt=time.monotonic() + delay)
                self._stop.wait(delay)
                delay = min(2 * delay, self.settings.load_retry_max_seconds)

    def load(self) -> LoadedModel:
        """Load the configured model now; on failure the current one (if any) keeps serving."""
        with self._lock:
            self.attempts += 1
            try:
                if self.loader is None:
                    from service.model import load_model

                    self.loader = load_model
                model = self.loader(self.settings)
            except Exception as error:
                metrics.LOADS.labels("failed").inc()
                self.last_failure = Failure(describe(error), _now(), self.attempts)
                log.error("model load from %s failed, %s: %s", self.settings.model_uri,
                          "keeping the current model" if self.model else "not ready",
                          self.last_failure.error)
                raise
            try:
                model = replace(model, checks=self.checker(model, self.model, self.settings))
            except Exception as error:
                from service.checks import CandidateRejected

                if not isinstance(error, CandidateRejected):
                    error = CandidateRejected(f"a check could not run: {describe(error)}")
                metrics.LOADS.labels("rejected").inc()
                self.rejected = (model.stored.version, model.stored.digest)
                self.last_failure = Failure(
                    f"version {model.stored.version} rejected: {error}", _now(),
                    self.attempts, outcome="rejected")
                log.error("model %s version %s from %s rejected, %s: %s", model.stored.name,
                          model.stored.version, self.settings.model_uri,
                          "keeping the current model" if self.model else "not ready", error)
                raise error from None
            previous = self.model.stored if self.model else None
            self.model, self.last_failure = model, None  # the swap: one reference assignment
            metrics.LOADS.labels("loaded").inc()
            metrics.served(model.stored.name, model.stored.version, model.stored.digest,
                           (previous.name, previous.version, previous.digest) if previous
                           else None)
            log.info("serving %s version %s (sha256 %s..., integrity: %s)", model.stored.name,
                     model.stored.version, model.stored.digest[:12], model.integrity)
            return model

    def failure(self) -> dict[str, Any] | None:
        """The last failed load, while it is the latest word (one read of the state)."""
        failure, model = self.last_failure, self.model
        if failure is None:
            return None
        retry = (max(0.0, round(failure.next_attempt - time.monotonic(), 1))
                 if failure.next_attempt is not None and model is None else None)
        return {"error": failure.error, "outcome": failure.outcome, "at": failure.at,
                "attempts": failure.attempts, "next_attempt_in_s": retry}


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
