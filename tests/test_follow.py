"""Following a registry alias: polling and MLflow's webhook move the service to the version
the alias names, only after the checks pass; a refused version never serves.

The slot tests use a fake registry (a dict the test moves) and fake models, so they test
the slot's logic alone; the checks run on the model the e2e training exported; the webhook
runs in process (TestClient) against deliveries signed as MLflow signs them.
tests/test_registry_follow.py does the same against a real `mlflow server`.
"""

from __future__ import annotations

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

from service import webhook
from service.app import create_app
from service.checks import CandidateRejected, check
from service.loading import ModelSlot, check_candidate
from service.model import LoadedModel, load_model
from service.settings import Settings
from tests.conftest import Trained
from training.bundle import StoredModel
from training.cohort import load_cohort
from training.golden import GOLDEN_KEY

ALIAS_URI = "models:/itp-response@champion"
SECRET = "webhook-secret-for-tests"


class FakeRegistry:
    """Where the alias points, and a model per version; counts what the slot asked."""

    def __init__(self) -> None:
        self.version = "1"
        self.questions = 0
        self.loads: list[str] = []
        self.gate: threading.Event | None = None  # set: loads wait for it
        self.failures = 0  # loads still to fail, as an interrupted download would

    def resolve(self, settings: Settings) -> str:
        self.questions += 1
        return self.version

    def load(self, settings: Settings) -> LoadedModel:
        version = self.version
        if self.gate is not None:
            self.gate.wait(30)
        if self.failures:
            self.failures -= 1
            raise ConnectionError("artifact download interrupted")
        self.loads.append(version)
        stored = StoredModel(model=None, name="itp-response", version=version,  # type: ignore[arg-type]
                             run_id=f"run-{version}", source=ALIAS_URI,
                             digest=f"{version:0>64}", metadata={})
        return LoadedModel(stored=stored, compiled=None)  # type: ignore[arg-type]


def refuse(*versions: str) -> Callable[[LoadedModel, LoadedModel | None, Settings],
                                       dict[str, str]]:
    def checker(candidate: LoadedModel, serving: LoadedModel | None,
                settings: Settings) -> dict[str, str]:
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
    settings = Settings(model_uri=ALIAS_URI, tracking_uri=None, poll_seconds=0.02)
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
        exported: LoadedModel) -> None:
    """ITP_MAX_TAXA and the like bound a request's cost; they say nothing about a model, so
    a small limit must not make every new version unservable."""
    settings = Settings(model_uri=ALIAS_URI, tracking_uri=None, max_taxa=2, max_batch=1)
    assert check_candidate(exported, None, settings)["golden"] == "passed"


def test_incompatible_candidates_are_rejected(exported: LoadedModel) -> None:
    other_outcome = with_metadata(exported, definition="ge50-not-what-we-serve")
    with pytest.raises(CandidateRejected, match="definition"):
        check(other_outcome, exported)
    serving_more = replace(exported)
    serving_more.__dict__["treatments"] = [*exported.treatments, "splenectomy-like"]
    with pytest.raises(CandidateRejected, match="does not answer treatments"):
        check(exported, serving_more)
    unknown = replace(exported)
    unknown.__dict__["treatments"] = [*exported.treatments, "homeopathy"]
    with pytest.raises(CandidateRejected, match="the API does not accept: homeopathy"):
        check(unknown, None)
    newer = copy.deepcopy(exported.stored.model)  # as if trained on a field we do not take
    encoder = newer.pipeline_.named_steps["features"].named_transformers_["clinical"]
    encoder.feature_names_out_ = np.append(encoder.feature_names_out_, "d_dimer_mg_l")
    with pytest.raises(CandidateRejected, match=r"clinical fields .* d_dimer_mg_l"):
        check(replace(exported, stored=replace(exported.stored, model=newer)), None)


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
                        webhook_secret=SECRET, webhook_max_age_seconds=300,
                        api_keys="k-" + "2" * 30)
    slot = ModelSlot(settings, registry.load, registry.resolve, refuse())
    with TestClient(create_app(settings, slot)) as client:
        wait_for(lambda: slot.model is not None, "the first load")
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
    (lambda: delivery(alias_moved(), at=time.time() - 301), 401),  # stale: a replay
    (lambda: delivery(alias_moved(), at=time.time() + 301), 401),  # from the future
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
