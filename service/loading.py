"""The serving model's slot: loaded in the background, swapped only when a new one is whole.

The process answers `/health` from its first second whatever the registry does: the model
stack is imported and the first load runs in a thread, retried with exponential backoff,
and `/ready` says why it is not ready yet. A failed reload keeps the old model serving and
is reported until one succeeds.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from service import metrics
from service.settings import Settings

if TYPE_CHECKING:  # the model stack (mlflow, scikit-learn, xgboost) loads in the thread
    from service.model import LoadedModel

log = logging.getLogger("service")


class ModelSlot:
    def __init__(self, settings: Settings,
                 loader: Callable[[Settings], LoadedModel] | None = None) -> None:
        self.settings = settings
        self.loader = loader
        self.model: LoadedModel | None = None
        self.error: str | None = None  # why the last attempt failed
        self.failed_at: str | None = None
        self.attempts = 0
        self.next_attempt: float | None = None  # monotonic time of the next retry
        self._lock = threading.Lock()
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
                self.next_attempt = time.monotonic() + delay
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
                self.error = f"{type(error).__name__}: {error}"
                self.failed_at = datetime.now(UTC).isoformat(timespec="seconds")
                log.error("model load from %s failed, %s: %s", self.settings.model_uri,
                          "keeping the current model" if self.model else "not ready", self.error)
                raise
            previous = self.model.stored if self.model else None
            self.model, self.error, self.failed_at, self.next_attempt = model, None, None, None
            metrics.LOADS.labels("loaded").inc()
            metrics.served(model.stored.name, model.stored.version, model.stored.digest,
                           (previous.name, previous.version, previous.digest) if previous
                           else None)
            log.info("serving %s version %s (sha256 %s..., integrity: %s)", model.stored.name,
                     model.stored.version, model.stored.digest[:12], model.integrity)
            return model

    def failure(self) -> dict[str, Any] | None:
        """The last failed load, while it is the latest word."""
        if self.error is None:
            return None
        retry = (max(0.0, round(self.next_attempt - time.monotonic(), 1))
                 if self.next_attempt is not None and self.model is None else None)
        return {"error": self.error, "at": self.failed_at, "attempts": self.attempts,
                "next_attempt_in_s": retry}
