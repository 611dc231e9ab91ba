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

A version refused for what it is (its files do not match their digest, or a check failed on
it) is remembered by version and digest and not downloaded again: the same bytes would be
refused the same way. A transport or registry error is retried with exponential backoff.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import OrderedDict
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

Checker = Callable[["LoadedModel", "LoadedModel | None"], dict[str, str]]
Version = tuple[str, str | None]  # a registry version and the digest recorded on it
REMEMBERED = 64  # refused (version, digest) pairs kept: alias moves are rare


@dataclass(frozen=True)
class Failure:
    """The last failed load, replaced whole so that readers never see half an update."""

    error: str
    at: str
    attempts: int
    next_attempt: float | None = None  # monotonic time of the next retry, at start-up
    outcome: str = "failed"  # or "rejected": the version itself was refused
    code: str = "load_failed"  # a short reason for the public /ready: never a URL or path


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


def registry_version(settings: Settings) -> Version:
    """Where the alias points now and the digest recorded on that version: one cheap
    registry call, no download."""
    from mlflow import MlflowClient

    from service.model import check_tracking_uri
    from training.bundle import DIGEST_TAG

    if settings.tracking_uri:  # MLflow would create a missing SQLite store, empty
        check_tracking_uri(settings.tracking_uri)
    name, alias = alias_of(settings.model_uri) or ("", "")
    client = MlflowClient(tracking_uri=settings.tracking_uri)
    found = client.get_model_version_by_alias(name, alias)
    return str(found.version), found.tags.get(DIGEST_TAG)


def check_candidate(candidate: LoadedModel, serving: LoadedModel | None) -> dict[str, str]:
    from service.checks import check

    return check(candidate, serving)


def reason_code(error: Exception) -> str:
    """A short, fixed reason for the public /ready: an error's message may name the
    registry's URL, a host or a file path, which only /v1/model (behind a key) shows."""
    from service.checks import CandidateRejected

    if isinstance(error, CandidateRejected):
        return f"{error.check}_check_failed"
    if _integrity_error(error):
        return str(getattr(error, "kind", "integrity_error"))
    return "load_failed"


def _integrity_error(error: Exception) -> bool:
    from training.bundle import ModelIntegrityError

    return isinstance(error, ModelIntegrityError)


class ModelSlot:
    def __init__(self, settings: Settings,
                 loader: Callable[[Settings], LoadedModel] | None = None,
                 resolver: Callable[[Settings], Version] | None = None,
                 checker: Checker | None = None) -> None:
        self.settings = settings
        self.loader = loader
        self.resolver = resolver or registry_version
        self.checker = checker or check_candidate
        self.model: LoadedModel | None = None
        self.last_failure: Failure | None = None
        # (version, digest) refused for what they are, not for what was serving: the same
        # bytes are refused the same way by every replica, so they are not fetched again
        self.rejected: OrderedDict[Version, str] = OrderedDict()
        self.followed = Follow()
        self.attempts = 0
        self._lock = threading.Lock()  # one load at a time; readers never take it
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._served = threading.Event()  # set once a model serves

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
        """Ask at every poll and wake-up; after a registry or transport error, again with
        exponential backoff (not capped by the poll interval), so that a webhook-only
        service does not wait for the next delivery and a fast poll does not hammer a
        registry that is down."""
        # Until the first model serves, a wake-up is left set: the first load may have
        # resolved the alias before it moved, and the delivery saying so must not be lost.
        while not self._served.wait(0.2):
            if self._stop.is_set():
                return
        poll = self.settings.poll_seconds or None  # None: wait for the webhook only
        timeout, delay = poll, 1.0
        while not self._stop.is_set():
            self._wake.wait(timeout)
            self._wake.clear()
            if self._stop.is_set():
                return
            if self.check_alias() == "failed":
                timeout = delay
                delay = min(2 * delay, self.settings.load_retry_max_seconds)
            else:
                timeout, delay = poll, 1.0

    def check_alias(self) -> str:
        """Ask the registry where the alias points; load, check and swap if it moved.
        Returns unchanged, swapped, rejected (now or before) or failed (to ask or load)."""
        try:
            target = self.resolver(self.settings)
        except Exception as error:
            self.followed = replace(self.followed, error=describe(error), checked_at=_now())
            log.warning("asking the registry where %s points failed: %s",
                        self.settings.model_uri, self.followed.error)
            return "failed"
        version = target[0]
        self.followed = Follow(version, _now())
        serving = self.model
        if serving is None or version == serving.stored.version:
            return "unchanged"
        if target in self.rejected:
            return "rejected"  # refused already: the same version and digest, the same bytes
        log.info("%s now points at version %s (serving %s): loading it",
                 self.settings.model_uri, version, serving.stored.version)
        try:
            self.load(target)
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
        """The first load, retried with backoff; a followed alias still naming a version
        already refused is not downloaded again (it waits for the alias to move)."""
        delay = 1.0
        while self.model is None and not self._stop.is_set():
            target = self._target()
            try:
                if target is None or target not in self.rejected:
                    self.load(target)
                    return
            except Exception:  # recorded by load(); retried
                pass
            failure = self.last_failure
            if failure is not None:
                self.last_failure = replace(failure, next_attempt=time.monotonic() + delay)
            self._stop.wait(delay)
            delay = min(2 * delay, self.settings.load_retry_max_seconds)

    def _target(self) -> Version | None:
        """Where a followed alias points, if the registry says (the load reports errors)."""
        if not self.follows:
            return None
        try:
            return self.resolver(self.settings)
        except Exception:
            return None

    def _remember(self, key: Version, reason: str) -> None:
        self.rejected[key] = reason
        while len(self.rejected) > REMEMBERED:
            self.rejected.popitem(last=False)

    def load(self, target: Version | None = None) -> LoadedModel:
        """Load the configured model now (`target`: the registry version and digest the
        alias named, to remember if its files are refused); on failure the current model
        (if any) keeps serving."""
        with self._lock:
            self.attempts += 1
            keeping = "keeping the current model" if self.model else "not ready"
            try:
                if self.loader is None:
                    from service.model import load_model

                    self.loader = load_model
                model = self.loader(self.settings)
            except Exception as error:
                if _integrity_error(error):  # the same bytes fail the same way: no retry
                    metrics.LOADS.labels("rejected").inc()
                    if target is not None:
                        self._remember(target, describe(error))
                    self.last_failure = Failure(describe(error), _now(), self.attempts,
                                                outcome="rejected", code=reason_code(error))
                    log.error("model from %s refused (integrity), %s: %s",
                              self.settings.model_uri, keeping, self.last_failure.error)
                    raise
                metrics.LOADS.labels("failed").inc()
                self.last_failure = Failure(describe(error), _now(), self.attempts)
                log.error("model load from %s failed, %s: %s", self.settings.model_uri,
                          keeping, self.last_failure.error)
                raise
            try:
                model = replace(model, checks=self.checker(model, self.model))
            except Exception as error:
                from service.checks import CandidateRejected

                if not isinstance(error, CandidateRejected):
                    error = CandidateRejected(f"a check could not run: {describe(error)}",
                                              "check")
                metrics.LOADS.labels("rejected").inc()
                self._remember((str(model.stored.version), model.stored.digest), str(error))
                self.last_failure = Failure(
                    f"version {model.stored.version} rejected: {error}", _now(),
                    self.attempts, outcome="rejected", code=reason_code(error))
                log.error("model %s version %s from %s rejected, %s: %s", model.stored.name,
                          model.stored.version, self.settings.model_uri, keeping, error)
                raise error from None
            previous = self.model.stored if self.model else None
            self.model, self.last_failure = model, None  # the swap: one reference assignment
            self._served.set()
            metrics.LOADS.labels("loaded").inc()
            metrics.served(model.stored.name, model.stored.version, model.stored.digest,
                           (previous.name, previous.version, previous.digest) if previous
                           else None)
            log.info("serving %s version %s (sha256 %s..., integrity: %s)", model.stored.name,
                     model.stored.version, model.stored.digest[:12], model.integrity)
            for name, result in model.checks.items():
                if "warning" in result:
                    log.warning("model %s version %s, check %s: %s", model.stored.name,
                                model.stored.version, name, result)
            return model

    def failure(self) -> dict[str, Any] | None:
        """The last failed load, while it is the latest word (one read of the state), with
        its full reason: for /v1/model, behind the API key."""
        failure, model = self.last_failure, self.model
        if failure is None:
            return None
        retry = (max(0.0, round(failure.next_attempt - time.monotonic(), 1))
                 if failure.next_attempt is not None and model is None else None)
        return {"error": failure.error, "outcome": failure.outcome, "reason": failure.code,
                "at": failure.at, "attempts": failure.attempts, "next_attempt_in_s": retry}

    def public_failure(self) -> dict[str, Any] | None:
        """The last failure for the public /ready: its outcome and a short reason code in
        place of the message, which may name the registry's URL, a host or a file path."""
        failure = self.failure()
        if failure is None:
            return None
        return failure | {"error": failure["reason"]}


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
