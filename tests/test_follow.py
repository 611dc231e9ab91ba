"""Following a registry alias: polling and MLflow's webhook move the service to the version
the alias names, only after the checks pass; a refused version never serves.

The slot tests use a fake registry (a dict the test moves) and fake models, so they test
the slot's logic alone; the checks run on the model the e2e training exported; the webhook
runs in process (TestClient) against deliveries signed as MLflow signs them.
tests/test_registry_follow.py does the same against a real `mlflow server`.
"""

from __future__ import annotations

import asyncio
import copy
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY
from pydantic import ValidationError

from service import webhook
from service.app import create_app
from service.checks import CandidateRejected, check
from service.loading import ModelSlot, Version
from service.model import LoadedModel, load_model
from service.settings import Settings
from tests.conftest import Trained
from tests.helpers import raw_frame
from training.bundle import ModelIntegrityError, StoredModel
from training.cohort import load_cohort
from training.golden import GOLDEN_KEY, MIN_GROUP, golden_patients

ALIAS_URI = "models:/itp-response@champion"
KEY = "k-" + "2" * 30
SECRET = "webhook-secret-for-tests-" + "0" * 16  # ITP_WEBHOOK_SECRET: 32 characters or more
MAX_AGE = 300


def fast(settings: Settings, poll: float = 0.02) -> Settings:
    """Polling faster than the 1 s an operator may set (Settings refuses less), so that the
    slot tests take a fraction of a second."""
    return settings.model_copy(update={"poll_seconds": poll})


class FakeRegistry:
    """Where the alias points, and a model per version; counts what the slot asked."""

    def __init__(self) -> None:
        self.version = "1"
        self.questions = 0
        self.attempts: list[str] = []  # every download started
        self.loads: list[str] = []  # every download that delivered a model
        self.loading = threading.Event()  # set when a download starts
        self.gate: threading.Event | None = None  # set: loads wait for it
        self.failures = 0  # loads still to fail, as an interrupted download would
        self.tampered: set[str] = set()  # versions whose files do not match their digest
        self.digests: dict[str, str] = {}  # digest recorded on a version, if not the default

    def digest(self, version: str) -> str:
        return self.digests.get(version, f"{version:0>64}")

    def resolve(self, settings: Settings) -> Version:
        self.questions += 1
        return self.version, self.digest(self.version)

    def load(self, settings: Settings) -> LoadedModel:
        version = self.version
        self.attempts.append(version)
        self.loading.set()
        if self.gate is not None:
            self.gate.wait(30)
        if self.failures:
            self.failures -= 1
            raise ConnectionError("artifact download interrupted")
        if version in self.tampered:
            raise ModelIntegrityError(f"itp-response version {version}: files do not match "
                                      f"the registered digest", kind="digest_mismatch")
        self.loads.append(version)
        stored = StoredModel(model=None, name="itp-response", version=version,  # type: ignore[arg-type]
                             run_id=f"run-{version}", source=ALIAS_URI,
                             digest=self.digest(version), metadata={})
        return LoadedModel(stored=stored, compiled=None)  # type: ignore[arg-type]


def refuse(*versions: str) -> Callable[[LoadedModel, LoadedModel | None], dict[str, str]]:
    def checker(candidate: LoadedModel, serving: LoadedModel | None,
                *_: Any) -> dict[str, str]:
        if candidate.stored.version in versions:
            raise CandidateRejected("golden predictions not reproduced (test)")
        return {"compatible": "passed", "golden": "passed", "additive": "passed"}
    return checker


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 30) -> None:
    """Bounded wait for something the background thread does (not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting: {what}"
        time.sleep(0.01)


def loads(outcome: str) -> float:
    return REGISTRY.get_sample_value("itp_model_loads_total", {"outcome": outcome}) or 0.0


@pytest.fixture
def registry() -> FakeRegistry:
    return FakeRegistry()


@pytest.fixture
def slot(registry: FakeRegistry) -> Iterator[ModelSlot]:
    settings = fast(Settings(model_uri=ALIAS_URI, tracking_uri=None))
    slot = ModelSlot(settings, registry.load, registry.resolve, refuse("3"))
    slot.start()
    wait_for(lambda: slot.model is not None, "the first load")
    yield slot
    slot.stop()


def version(slot: ModelSlot) -> str | None:
    model = slot.model
    return model.stored.version if model else None


def test_polling_swaps_to_the_version_the_alias_moves_to(slot: ModelSlot,
                                                         registry: FakeRegistry) -> None:
    taken = slot.model  # a request in flight holds this object
    registry.version = "2"
    wait_for(lambda: version(slot) == "2", "the swap to version 2")
    assert taken is not None and taken.stored.version == "1"  # untouched by the swap
    assert slot.model is not None and slot.model.checks["golden"] == "passed"
    assert slot.following() is not None and slot.following()["registry_version"] == "2"
    asked = registry.questions
    wait_for(lambda: registry.questions > asked + 3, "more polls")
    assert registry.loads == ["1", "2"]  # an unchanged alias loads nothing


def test_a_version_that_fails_a_check_never_serves_and_is_not_retried(
        slot: ModelSlot, registry: FakeRegistry) -> None:
    rejected = loads("rejected")
    registry.version = "3"
    wait_for(lambda: slot.failure() is not None, "the rejection")
    failure = slot.failure()
    assert failure is not None and failure["outcome"] == "rejected"
    assert "version 3 rejected" in failure["error"] and "golden" in failure["error"]
    assert version(slot) == "1"
    assert loads("rejected") == rejected + 1
    asked = registry.questions
    wait_for(lambda: registry.questions > asked + 3, "more polls")
    assert registry.loads == ["1", "3"] and version(slot) == "1"
    registry.digests["3"] = "f" * 64  # re-registered with other files: worth a new look
    wait_for(lambda: registry.loads.count("3") == 2, "version 3 with another digest")
    assert version(slot) == "1"  # (refused again by this test's checker)
    registry.version = "4"  # the next good version still gets through
    wait_for(lambda: version(slot) == "4", "the swap to version 4")
    assert slot.failure() is None


def test_a_registry_error_is_reported_and_the_model_keeps_serving(
        slot: ModelSlot, registry: FakeRegistry) -> None:
    def broken(settings: Settings) -> str:
        raise ConnectionError("registry down")

    slot.resolver = broken
    wait_for(lambda: (slot.following() or {}).get("error") is not None, "the poll error")
    assert "registry down" in slot.following()["error"]
    assert version(slot) == "1"


def test_a_failed_load_is_retried_without_waiting_for_another_webhook(
        registry: FakeRegistry) -> None:
    settings = Settings(model_uri=ALIAS_URI, tracking_uri=None, poll_seconds=0,
                        webhook_secret=SECRET)
    slot = ModelSlot(settings, registry.load, registry.resolve, refuse())
    slot.start()
    try:
        wait_for(lambda: slot.model is not None, "the first load")
        failed = loads("failed")
        registry.version, registry.failures = "2", 1
        slot.wake()  # one delivery
        wait_for(lambda: version(slot) == "2", "the retried load")
        assert loads("failed") == failed + 1 and registry.loads == ["1", "2"]
    finally:
        slot.stop()


def test_a_webhook_during_the_first_load_is_not_lost(registry: FakeRegistry) -> None:
    """The first load resolved version 1; the alias moved and its delivery came while that
    load was still downloading. Webhook only (no polling): the wake-up must wait for the
    first model to serve, not be used up while there is none."""
    settings = Settings(model_uri=ALIAS_URI, tracking_uri=None, poll_seconds=0,
                        webhook_secret=SECRET)
    slot = ModelSlot(settings, registry.load, registry.resolve, refuse())
    registry.gate = threading.Event()
    slot.start()
    try:
        assert registry.loading.wait(30)  # downloading version 1
        registry.version = "2"
        slot.wake()  # the delivery
        time.sleep(0.5)  # the follower runs meanwhile
        registry.gate.set()
        wait_for(lambda: version(slot) is not None, "the first load")
        wait_for(lambda: version(slot) == "2", "the swap the delivery asked for", timeout=10)
    finally:
        slot.stop()


def test_a_failing_download_is_retried_with_backoff_not_at_every_poll(
        registry: FakeRegistry) -> None:
    """A transport error backs off exponentially from 1 s, whatever the poll interval."""
    slot = ModelSlot(fast(Settings(model_uri=ALIAS_URI, tracking_uri=None)), registry.load,
                     registry.resolve, refuse())
    slot.start()
    try:
        wait_for(lambda: slot.model is not None, "the first load")
        registry.version, registry.failures = "2", 1000
        time.sleep(1.5)  # 75 polls: attempts at about 0 s and 1 s, the next at 3 s
        assert 1 <= registry.attempts.count("2") <= 3, registry.attempts.count("2")
        assert slot.failure() is not None and slot.failure()["outcome"] == "failed"
        registry.failures = 0
        wait_for(lambda: version(slot) == "2", "a retry after the backoff", timeout=15)
    finally:
        slot.stop()


def test_a_version_whose_files_fail_their_digest_is_refused_once_not_at_every_poll(
        slot: ModelSlot, registry: FakeRegistry) -> None:
    """An integrity failure is a property of the bytes: remembered like a rejection (by
    version and digest), not downloaded again at every poll."""
    rejected = loads("rejected")
    registry.tampered.add("5")
    registry.version = "5"
    wait_for(lambda: (slot.failure() or {}).get("outcome") == "rejected", "the refusal")
    failure, public = slot.failure(), slot.public_failure()
    assert failure is not None and "registered digest" in failure["error"]
    assert public is not None and public["error"] == "digest_mismatch"
    asked = registry.questions
    wait_for(lambda: registry.questions > asked + 5, "more polls")
    assert registry.attempts.count("5") == 1 and version(slot) == "1"
    assert loads("rejected") == rejected + 1
    registry.tampered.clear()  # version 5 re-registered with its real digest
    registry.digests["5"] = "e" * 64
    wait_for(lambda: version(slot) == "5", "the swap once the digest is another")


def test_a_followed_alias_naming_a_refused_version_is_not_downloaded_again_at_start(
        registry: FakeRegistry) -> None:
    registry.version = "5"
    registry.tampered.add("5")
    slot = ModelSlot(fast(Settings(model_uri=ALIAS_URI, tracking_uri=None,
                                   load_retry_max_seconds=0.05)),
                     registry.load, registry.resolve, refuse())
    slot.start()
    try:
        wait_for(lambda: registry.questions > 5, "retries at start-up")
        assert registry.attempts == ["5"] and slot.model is None
        assert (slot.failure() or {}).get("outcome") == "rejected"
        registry.version = "6"  # the alias moves on: loaded
        wait_for(lambda: version(slot) == "6", "the first model")
    finally:
        slot.stop()


def test_no_follower_for_a_fixed_version_or_with_polling_and_webhook_off() -> None:
    for settings in (Settings(model_uri="models:/itp-response/3", tracking_uri=None),
                     Settings(model_uri="models/itp-response", tracking_uri=None),
                     Settings(model_uri=ALIAS_URI, tracking_uri=None, poll_seconds=0)):
        assert not ModelSlot(settings).follows
        assert ModelSlot(settings).following() is None
    assert ModelSlot(Settings(model_uri=ALIAS_URI, tracking_uri=None, poll_seconds=0,
                              webhook_secret=SECRET)).follows


# --- the checks, on the model training exported ----------------------------------------------


@pytest.fixture(scope="module")
def exported(trained: Trained) -> LoadedModel:
    return load_model(Settings(model_uri=str(trained.bundle), tracking_uri=None))


def with_metadata(model: LoadedModel, **changes: Any) -> LoadedModel:
    metadata = json.loads(json.dumps(model.stored.metadata)) | changes
    return replace(model, stored=replace(model.stored, metadata=metadata))


def test_training_records_golden_patients_without_identifiers(exported: LoadedModel,
                                                              trained: Trained) -> None:
    golden = exported.stored.metadata[GOLDEN_KEY]
    assert 3 <= len(golden["patients"]) <= 5
    assert len(golden["probability"]) == len(golden["shap"]) == len(golden["patients"])
    ids = {p["patient_id"] for p in golden["patients"]}
    assert all(i.startswith("golden-") for i in ids)
    cohort = load_cohort(trained.data)
    identifiers = {*map(str, cohort.metadata.index), *map(str, cohort.groups)}
    text = json.dumps(golden)
    assert not any(f'"{i}"' in text for i in identifiers)  # no sample or subject id


def test_the_exported_model_passes_every_check(exported: LoadedModel) -> None:
    assert check(exported, None) == {"compatible": "passed", "golden": "passed",
                                               "additive": "passed"}
    assert check(exported, exported)["golden"] == "passed"


@pytest.mark.parametrize("change, reason", [
    (lambda g: g | {"probability": [p + 1e-7 for p in g["probability"]]},
     "golden predictions not reproduced"),
    (lambda g: g | {"shap": [{k: v * 1.01 for k, v in row.items()} for row in g["shap"]]},
     "golden SHAP values not reproduced"),
    (lambda g: g | {"base_value": g["base_value"] + 0.01}, "golden SHAP values not reproduced"),
    (lambda g: g | {"patients": [{**p, "clinical": {"age_years": 500}}
                                 for p in g["patients"]]}, "refused by the request schema"),
    (lambda g: g | {"format": 99}, "unknown format"),
])
def test_golden_predictions_that_do_not_reproduce_are_rejected(
        exported: LoadedModel, change: Callable[[dict[str, Any]], dict[str, Any]],
        reason: str) -> None:
    golden = json.loads(json.dumps(exported.stored.metadata[GOLDEN_KEY]))
    candidate = with_metadata(exported, **{GOLDEN_KEY: change(golden)})
    with pytest.raises(CandidateRejected, match=reason):
        check(candidate, exported)


def test_a_model_without_golden_predictions_passes_with_the_check_skipped(
        exported: LoadedModel) -> None:
    old = with_metadata(exported)
    old.stored.metadata.pop(GOLDEN_KEY)
    checks = check(old, exported)
    assert checks["compatible"] == "passed"
    assert checks["golden"].startswith("skipped") and checks["additive"].startswith("skipped")


def test_golden_patients_pass_whatever_the_configured_size_limits(
        trained: Trained) -> None:
    """ITP_MAX_TAXA and the like bound a request's cost; they say nothing about a model, so
    a small limit must not make every new version unservable: a slot configured with tiny
    limits loads the exported model with its golden check passed."""
    settings = Settings(model_uri=str(trained.bundle), tracking_uri=None, max_taxa=1,
                        max_batch=1, max_key_length=16)
    golden = load_model(settings).stored.metadata[GOLDEN_KEY]["patients"]
    assert len(golden) > 1 and max(len(p["microbiome"]["counts"]) for p in golden) > 1
    assert ModelSlot(settings).load().checks["golden"] == "passed"


def test_models_reading_what_the_api_does_not_accept_are_rejected(
        exported: LoadedModel) -> None:
    unknown = replace(exported)
    unknown.__dict__["treatments"] = [*exported.treatments, "homeopathy"]
    with pytest.raises(CandidateRejected, match="the API does not accept: homeopathy"):
        check(unknown, None)
    newer = copy.deepcopy(exported.stored.model)  # as if trained on a field we do not take
    encoder = newer.pipeline_.named_steps["features"].named_transformers_["clinical"]
    encoder.feature_names_out_ = np.append(encoder.feature_names_out_, "d_dimer_mg_l")
    with pytest.raises(CandidateRejected, match=r"clinical fields .* d_dimer_mg_l"):
        check(replace(exported, stored=replace(exported.stored, model=newer)), exported)


def test_other_answers_than_the_serving_model_pass_with_a_warning(
        exported: LoadedModel) -> None:
    """Only the API's request schema decides: the verdict is the same on every replica,
    whatever each served before (a restarted one included)."""
    serving_more = replace(exported)
    serving_more.__dict__["treatments"] = [*exported.treatments, "splenectomy-like"]
    checks = check(exported, serving_more)
    assert checks["compatible"].startswith("passed, with a warning")
    assert "splenectomy-like" in checks["compatible"] and checks["golden"] == "passed"
    other_outcome = with_metadata(exported, definition="ge50-not-what-we-serve")
    assert "definition" in check(other_outcome, exported)["compatible"]
    assert check(other_outcome, None)["compatible"] == "passed"


def test_rolling_back_to_a_version_with_fewer_treatments_is_not_refused(
        exported: LoadedModel, registry: FakeRegistry,
        caplog: pytest.LogCaptureFixture) -> None:
    """The documented rollback: version 2 added a treatment, the alias moves back to 1."""
    fewer = replace(exported, stored=replace(exported.stored, version="1"))
    fewer.__dict__["treatments"] = exported.treatments[:-1]
    more = replace(exported, stored=replace(exported.stored, version="2"))
    models = {"1": fewer, "2": more}
    slot = ModelSlot(fast(Settings(model_uri=ALIAS_URI, tracking_uri=None)),
                     lambda settings: models[registry.version], registry.resolve)  # real checks
    slot.start()
    try:
        wait_for(lambda: version(slot) == "1", "version 1")
        registry.version = "2"
        wait_for(lambda: version(slot) == "2", "the promotion to version 2")
        with caplog.at_level("WARNING", logger="service"):
            registry.version = "1"
            wait_for(lambda: version(slot) == "1", "the rollback to version 1")
        assert slot.failure() is None and not slot.rejected
        compatible = slot.model.checks["compatible"] if slot.model else ""
        assert compatible.startswith("passed, with a warning")
        assert exported.treatments[-1] in compatible
        assert any("does not answer treatments" in r.getMessage() for r in caplog.records)
    finally:
        slot.stop()


# --- the golden patients ---------------------------------------------------------------------


def test_golden_patients_leave_out_a_field_measured_in_too_few_episodes() -> None:
    X = raw_frame(60, seed=3)
    X["treatment"] = "ivig"
    X["ipf_pct"] = np.nan
    X.loc[X.index[0], "ipf_pct"] = 7.123456  # one patient's lab
    X.loc[X.index[: MIN_GROUP - 1], "tpo_pg_ml"] = 123.456  # too few to aggregate
    X["age_years"] = np.linspace(30.1234, 70.9876, len(X))
    patients = golden_patients(X, ["ivig"])
    assert patients
    text = json.dumps(patients)
    assert "7.123456" not in text and "123.456" not in text
    clinical = patients[0]["clinical"]
    assert "ipf_pct" not in clinical and "tpo_pg_ml" not in clinical
    assert clinical["age_years"] == 51.0  # the median, 50.555..., to two significant digits
    X.loc[X.index[: MIN_GROUP], "tpo_pg_ml"] = 123.456
    assert golden_patients(X, ["ivig"])[0]["clinical"]["tpo_pg_ml"] == 120.0


def test_a_cohort_under_the_minimum_group_gets_no_golden_patients() -> None:
    X = raw_frame(MIN_GROUP - 1, seed=4)
    assert golden_patients(X, sorted(set(X["treatment"]))) == []
    assert golden_patients(raw_frame(MIN_GROUP, seed=4), ["corticosteroid", "ivig",
                                                          "tpo_ra"])


# --- the webhook -----------------------------------------------------------------------------


def delivery(body: dict[str, Any] | bytes, secret: str = SECRET, at: float | None = None,
             delivery_id: str | None = None, timestamp: str | None = None
             ) -> tuple[bytes, dict[str, str]]:
    """A delivery signed as mlflow/webhooks/delivery.py signs one."""
    from mlflow.webhooks.delivery import _generate_hmac_signature

    payload = body.decode() if isinstance(body, bytes) else json.dumps(body)
    delivery_id = delivery_id or str(uuid.uuid4())
    timestamp = timestamp or str(int(time.time() if at is None else at))
    return payload.encode(), {
        "Content-Type": "application/json", "X-MLflow-Delivery-Id": delivery_id,
        "X-MLflow-Timestamp": timestamp,
        "X-MLflow-Signature": _generate_hmac_signature(secret, delivery_id, timestamp,
                                                       payload)}


def alias_moved(name: str = "itp-response", alias: str = "champion",
                entity: str = "model_version_alias", action: str = "created"
                ) -> dict[str, Any]:
    return {"entity": entity, "action": action, "timestamp": "2026-01-01T00:00:00+00:00",
            "data": {"name": name, "alias": alias, "version": "2"}}


@pytest.fixture
def hooked(registry: FakeRegistry) -> Iterator[tuple[TestClient, ModelSlot]]:
    settings = Settings(model_uri=ALIAS_URI, tracking_uri=None, poll_seconds=0,
                        webhook_secret=SECRET, webhook_max_age_seconds=MAX_AGE,
                        api_keys=KEY)
    slot = ModelSlot(settings, registry.load, registry.resolve, refuse())
    with TestClient(create_app(settings, slot)) as client:
        wait_for(lambda: slot.model is not None, "the first load")
        registry.questions = 0  # count the questions the deliveries cause, from here
        yield client, slot


def post(client: TestClient, signed: tuple[bytes, dict[str, str]]) -> Any:
    return client.post("/v1/webhooks/mlflow", content=signed[0], headers=signed[1])


def test_a_signed_alias_event_loads_the_new_version_in_the_background(
        hooked: tuple[TestClient, ModelSlot], registry: FakeRegistry) -> None:
    client, slot = hooked
    registry.version = "2"
    registry.gate = threading.Event()  # the load waits: the request must not
    answer = post(client, delivery(alias_moved()))  # no API key: the HMAC authenticates
    assert answer.status_code == 202 and answer.json()["status"] == "accepted"
    assert version(slot) == "1"  # answered while the load is held
    registry.gate.set()
    wait_for(lambda: version(slot) == "2", "the swap after the webhook")
    assert client.get("/ready").json()["model"]["version"] == "2"


def test_without_polling_nothing_moves_until_the_webhook(
        hooked: tuple[TestClient, ModelSlot], registry: FakeRegistry) -> None:
    _, slot = hooked
    registry.version = "2"
    time.sleep(0.3)  # the follower waits for a wake-up only
    assert registry.questions == 0 and version(slot) == "1"


@pytest.mark.parametrize("make, status", [
    (lambda: delivery(alias_moved(), secret="another-secret"), 401),
    (lambda: (lambda b, h: (b, h | {"X-MLflow-Signature": "v1,AAAA"}))(
        *delivery(alias_moved())), 401),
    (lambda: (lambda b, h: (b, {k: v for k, v in h.items() if k != "X-MLflow-Signature"}))(
        *delivery(alias_moved())), 401),
    (lambda: (lambda b, h: (b.replace(b"champion", b"challenger"), h))(
        *delivery(alias_moved())), 401),  # body changed after signing
    # outside the window by 5 s: int() truncating the timestamp cannot bring it inside
    (lambda: delivery(alias_moved(), at=time.time() - MAX_AGE - 5), 401),  # stale: a replay
    (lambda: delivery(alias_moved(), at=time.time() + MAX_AGE + 5), 401),  # from the future
    (lambda: (lambda b, h: (b, h | {"X-MLflow-Timestamp": "yesterday"}))(
        *delivery(alias_moved())), 400),
    (lambda: (lambda b, h: (b, {k: v for k, v in h.items() if k != "X-MLflow-Delivery-Id"}))(
        *delivery(alias_moved())), 400),
    (lambda: delivery(b"not json"), 400),
    (lambda: delivery({"entity": "model_version_alias"}), 400),
])
def test_deliveries_that_do_not_verify_are_refused_and_load_nothing(
        hooked: tuple[TestClient, ModelSlot], registry: FakeRegistry,
        make: Callable[[], tuple[bytes, dict[str, str]]], status: int) -> None:
    client, slot = hooked
    registry.version = "2"
    answer = post(client, make())
    assert answer.status_code == status, answer.text
    time.sleep(0.2)
    assert registry.questions == 0 and version(slot) == "1"


@pytest.mark.parametrize("event, reason", [
    (alias_moved(action="deleted"), "not followed"),
    (alias_moved(entity="model_version"), "not followed"),
    (alias_moved(name="another-model"), "another model or alias"),
    (alias_moved(alias="challenger"), "another model or alias"),
])
def test_other_events_models_and_aliases_are_ignored(
        hooked: tuple[TestClient, ModelSlot], registry: FakeRegistry,
        event: dict[str, Any], reason: str) -> None:
    client, slot = hooked
    registry.version = "2"
    answer = post(client, delivery(event))
    assert answer.status_code == 200
    assert answer.json()["status"] == "ignored" and reason in answer.json()["reason"]
    time.sleep(0.2)
    assert registry.questions == 0 and version(slot) == "1"


def test_a_repeated_delivery_is_acted_on_once(hooked: tuple[TestClient, ModelSlot]) -> None:
    client, _ = hooked
    signed = delivery(alias_moved())
    assert post(client, signed).status_code == 202
    repeated = post(client, signed)
    assert repeated.status_code == 200 and "already" in repeated.json()["reason"]


def test_the_webhook_is_off_without_a_secret(registry: FakeRegistry, tmp_path: Path) -> None:
    settings = Settings(model_uri=ALIAS_URI, tracking_uri=None, poll_seconds=0)
    slot = ModelSlot(settings, registry.load, registry.resolve, refuse())
    with TestClient(create_app(settings, slot)) as client:
        assert post(client, delivery(alias_moved())).status_code == 404
        assert "/v1/webhooks/mlflow" not in client.get("/openapi.json").json()["paths"]


def test_openapi_says_the_webhook_needs_no_key(hooked: tuple[TestClient, ModelSlot]) -> None:
    client, _ = hooked
    operation = client.get("/openapi.json").json()["paths"]["/v1/webhooks/mlflow"]["post"]
    assert "security" not in operation
    assert "no API key" in operation["description"] and "HMAC" in operation["description"]


def test_a_signed_non_ascii_digit_timestamp_is_malformed_not_a_crash() -> None:
    """"\u00b2".isdigit() is True and int() refuses it: checked as ASCII digits."""
    body, headers = delivery(alias_moved(), timestamp="\u00b2")
    with pytest.raises(webhook.Refused) as refused:
        webhook.verify(SECRET.encode(), {k.lower(): v for k, v in headers.items()}, body, 300)
    assert refused.value.status == 400


def test_the_signature_is_mlflows() -> None:
    """Ours equals MLflow's own function, so a real delivery verifies."""
    from mlflow.webhooks.delivery import _generate_hmac_signature

    expected = _generate_hmac_signature(SECRET, "d-1", "1700000000", '{"a": 1}')
    assert webhook.signature(SECRET.encode(), "d-1", "1700000000", b'{"a": 1}') == expected


# --- webhook hardening -----------------------------------------------------------------------


@pytest.mark.parametrize("secret", ["", "short", "x" * 31])
def test_an_empty_or_short_webhook_secret_refuses_to_start(
        secret: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """An empty HMAC key is one anyone can sign with: the service must not start."""
    with pytest.raises(ValidationError, match="at least 32 characters"):
        Settings(model_uri=ALIAS_URI, tracking_uri=None, webhook_secret=secret)
    monkeypatch.setenv("ITP_WEBHOOK_SECRET", secret)
    monkeypatch.setenv("ITP_MODEL_URI", ALIAS_URI)
    with pytest.raises(ValidationError):
        create_app()
    assert Settings(model_uri=ALIAS_URI, tracking_uri=None,
                    webhook_secret="x" * 32).webhook_secret is not None


@pytest.mark.parametrize("poll, accepted", [(0, True), (1, True), (30, True), (0.5, False),
                                            (0.001, False), (-1, False)])
def test_polling_is_off_or_at_least_a_second(poll: float, accepted: bool) -> None:
    if accepted:
        assert Settings(model_uri=ALIAS_URI, tracking_uri=None,
                        poll_seconds=poll).poll_seconds == poll
    else:
        with pytest.raises(ValidationError):
            Settings(model_uri=ALIAS_URI, tracking_uri=None, poll_seconds=poll)


def _asgi_post(app: Any, path: str, chunks: int, chunk: bytes,
               headers: list[tuple[bytes, bytes]]) -> tuple[int, int]:
    """POST `chunks` body chunks straight through ASGI (no client buffering them first);
    returns the status and how many chunks the app pulled."""
    pulled = 0
    status = 0

    async def receive() -> dict[str, Any]:
        nonlocal pulled
        if pulled < chunks:
            pulled += 1
            return {"type": "http.request", "body": chunk, "more_body": pulled < chunks}
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(),
             "query_string": b"", "root_path": "", "headers": headers,
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    asyncio.run(app(scope, receive, send))
    return status, pulled


def test_the_webhook_reads_at_most_64_kib_of_a_body(registry: FakeRegistry) -> None:
    """A body over the webhook's 64 KiB is refused after 64 KiB, not read up to
    ITP_MAX_BODY_BYTES (32 MiB) first: anyone can post here."""
    settings = Settings(model_uri=ALIAS_URI, tracking_uri=None, poll_seconds=0,
                        webhook_secret=SECRET)
    app = create_app(settings, ModelSlot(settings, registry.load, registry.resolve, refuse()))
    status, pulled = _asgi_post(app, "/v1/webhooks/mlflow", 256, b"x" * 16384,
                                [(b"content-type", b"application/json")])  # 4 MiB, streamed
    assert status == 413
    assert pulled <= 5, f"read {pulled * 16} KiB"
    declared = [(b"content-type", b"application/json"), (b"content-length", b"1048576")]
    assert _asgi_post(app, "/v1/webhooks/mlflow", 64, b"x" * 16384, declared) == (413, 0)


def test_refused_deliveries_are_counted_and_logged_at_info_without_model_headers(
        hooked: tuple[TestClient, ModelSlot], caplog: pytest.LogCaptureFixture) -> None:
    """Refusals are what anyone on the network can cause: INFO and a counter, not a
    WARNING line each; and a caller with no key learns nothing about what serves."""
    client, _ = hooked
    refused = REGISTRY.get_sample_value("itp_webhook_deliveries_total",
                                        {"outcome": "refused_401"}) or 0.0
    with caplog.at_level("INFO", logger="service"):
        for _ in range(3):
            answer = post(client, delivery(alias_moved(), secret="another-secret"))
            assert answer.status_code == 401
            assert not [h for h in answer.headers if h.startswith("x-model-")]
        malformed = post(client, delivery(b"not json"))
    assert malformed.status_code == 400
    assert not [h for h in malformed.headers if h.startswith("x-model-")]
    assert REGISTRY.get_sample_value("itp_webhook_deliveries_total",
                                     {"outcome": "refused_401"}) == refused + 3
    lines = [r for r in caplog.records if "webhook delivery refused" in r.getMessage()]
    assert len(lines) == 4 and {r.levelname for r in lines} == {"INFO"}


def test_the_timestamp_window_with_an_explicit_clock() -> None:
    """The window's edges, with `now` given: a delivery sent at 1000.95 s with a timestamp
    301 s ahead truncates to 1301 and is only 300.0 s ahead at 1001.0 (inside the window):
    why the parametrized cases above use a margin of 5 s."""
    body, headers = delivery(alias_moved(), timestamp=str(int(1000.95 + 301)))
    lowered = {k.lower(): v for k, v in headers.items()}
    assert webhook.verify(SECRET.encode(), lowered, body, MAX_AGE, now=1001.0)
    for offset in (-MAX_AGE - 5, MAX_AGE + 5):
        body, headers = delivery(alias_moved(), timestamp=str(1000 + offset))
        with pytest.raises(webhook.Refused) as refused:
            webhook.verify(SECRET.encode(), {k.lower(): v for k, v in headers.items()}, body,
                           MAX_AGE, now=1000.0)
        assert refused.value.status == 401


def test_only_a_first_delivery_for_the_followed_alias_calls_for_action() -> None:
    followed = ("itp-response", "champion")
    replays = webhook.Replays()

    def delivery(event: str = webhook.ALIAS_CREATED, name: str = "itp-response",
                 alias: str = "champion", delivery_id: str = "d1") -> webhook.Delivery:
        return webhook.Delivery(delivery_id, event, {"name": name, "alias": alias})

    assert "not followed" in webhook.ignored_because(
        delivery(event="model_version.created"), followed, replays)
    assert "does not serve" in webhook.ignored_because(delivery(), None, replays)
    assert webhook.ignored_because(delivery(alias="staging"), followed, replays) == (
        "another model or alias")
    assert webhook.ignored_because(delivery(name="other"), followed, replays) == (
        "another model or alias")
    # none of those used up the delivery id: the first matching delivery is acted on, once
    assert webhook.ignored_because(delivery(), followed, replays) is None
    assert webhook.ignored_because(delivery(), followed, replays) == "delivery already received"
    assert webhook.ignored_because(delivery(delivery_id="d2"), followed, replays) is None
