"""The serving model's slot: loaded in the background, swapped only when a new one is whole.

The process answers `/health` from its first second whatever the registry does: the model
stack is imported and the first load runs in a thread, retried with exponential backoff,
and `/ready` says why it is not ready yet. A failed reload keeps the old model serving and
is reported until one succeeds.
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


@dataclass(frozen=True)
class Failure:
    """The last failed load, replaced whole so that readers never see half an update."""

    error: str
    at: str
    attempts: int
    next_attempt: float | None = None  # monotonic time of the next retry, at start-up


class ModelSlot:
    def __init__(self, settings: Settings,
                 loader: Callable[[Settings], LoadedModel] | None = None) -> None:
        self.settings = settings
        self.loader = loader
        self.model: LoadedModel | None = None
        self.last_failure: Failure | None = None
        self.attempts = 0
        self._lock = threading.Lock()  # one load at a time; readers never take it
        self._stop = threading.Event()

    def start(self) -> None:
        """Load in the background until a model serves (or `stop`)."""
        threading.Thread(target=self._until_loaded, name="model-loader", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

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
                self.last_failure = Failure(describe(error),
                                            datetime.now(UTC).isoformat(timespec="seconds"),
                                            self.attempts)
                log.error("model load from %s failed, %s: %s", self.settings.model_uri,
                          "keeping the current model" if self.model else "not ready",
                          self.last_failure.error)
                raise
            previous = self.model.stored if self.model else None
            self.model, self.last_failure = model, None
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
        return {"error": failure.error, "at": failure.at, "attempts": failure.attempts,
                "next_attempt_in_s": retry}
