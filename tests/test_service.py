"""Nothing a client sends breaks the service: the bad-input corpus, limits, strict types,
errors that never echo values, API keys, background loading and model integrity.

The app runs in process (FastAPI's TestClient, lifespan included) on the bundle the e2e
training exported; tests/test_e2e.py covers the same service over real HTTP.
"""

from __future__ import annotations

import base64
import json
import resource
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi.testclient import TestClient

from service.app import create_app
from service.loading import ModelSlot, reason_code
from service.model import LoadedModel, load_model
from service.settings import Settings
from tests.conftest import Trained
from tests.test_e2e import patients_from_cohort
from training import registry
from training.taxonomy import lineage_at_rank, parse_lineage, taxon_key

SECRET = "Jane-Doe-1970-01-01"  # sent as an id or a value: must never come back or be logged
KEY = "k-" + "1" * 30
MIB = 1024 * 1024


@contextmanager
def serving(settings: Settings, slot: ModelSlot | None = None, ready: bool = True
            ) -> Iterator[TestClient]:
    with TestClient(create_app(settings, slot)) as client:
        deadline = time.monotonic() + 60
        while ready and client.get("/ready").status_code != 200:
            assert time.monotonic() < deadline, client.get("/ready").json()
            time.sleep(0.05)
        yield client


@pytest.fixture(scope="module")
def client(trained: Trained) -> Iterator[TestClient]:
    with serving(Settings(model_uri=str(trained.bundle), max_body_bytes=16 * MIB,
                          tracking_uri=None, admin_token=None)) as client:
        yield client


@pytest.fixture(scope="module")
def patient(trained: Trained) -> dict[str, Any]:
    patients, _ = patients_from_cohort(trained.data, 1)
    return patients[0]


def _post(client: TestClient, body: Any, **headers: str) -> Any:
    content = body if isinstance(body, bytes) else json.dumps(body, allow_nan=True).encode()
    return client.post("/v1/predict", content=content,
                       headers={"content-type": "application/json", **headers})


def _with(patient: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    changed = json.loads(json.dumps(patient))
    *parents, leaf = path.split(".")
    target = changed
    for key in parents:
        target = target[key]
    target[leaf] = value
    return changed


def _raw(patient: dict[str, Any], path: str, literal: str) -> bytes:
    """The request with `path` set to a JSON literal json.dumps cannot write (1e400)."""
    marker = "__LITERAL__"
    return json.dumps({"patients": [_with(patient, path, marker)]}).replace(
        f'"{marker}"', literal).encode()


TAXON = ("d__Bacteria;p__Firmicutes;c__Clostridia;o__Oscillospirales;f__Ruminococcaceae;"
         "g__Faecalibacterium")

# (name, body builder, status, field the problem names)
CORPUS: list[tuple[str, Any, int, str | None]] = [
    ("infinity read", lambda p: _raw(p, f"microbiome.counts.{TAXON}", "Infinity"), 422,
     "microbiome.counts[#"),
    ("1e400 read", lambda p: _raw(p, f"microbiome.counts.{TAXON}", "1e400"), 422,
     "microbiome.counts[#"),
    ("NaN platelets", lambda p: _raw(p, "clinical.baseline_platelets", "NaN"), 422,
     "clinical.baseline_platelets"),
    ("1e400 age", lambda p: _raw(p, "clinical.age_years", "1e400"), 422, "clinical.age_years"),
    ("reads overflowing the total", lambda p: {"patients": [_with(
        p, "microbiome.counts", {TAXON: 1e308, TAXON + ";s__x": 1e308})]}, 422,
     "microbiome.counts[#"),
    ("true as reads", lambda p: {"patients": [_with(p, "microbiome.counts", {TAXON: True})]},
     422, "microbiome.counts[#0]"),
    ("true as platelets", lambda p: {"patients": [_with(p, "clinical.baseline_platelets",
                                                         True)]}, 422,
     "clinical.baseline_platelets"),
    ("false as a number", lambda p: {"patients": [_with(p, "clinical.age_years", False)]},
     422, "clinical.age_years"),
    ("string as a number", lambda p: {"patients": [_with(p, "clinical.age_years", "12")]},
     422, "clinical.age_years"),
    ("yes as a boolean", lambda p: {"patients": [_with(p, "clinical.h_pylori",
                                                        "yes")]}, 422,
     "clinical.h_pylori"),
    ("empty profile", lambda p: {"patients": [_with(p, "microbiome.counts", {})]}, 422,
     "microbiome.counts"),
    ("all-zero profile", lambda p: {"patients": [_with(p, "microbiome.counts",
                                                        {TAXON: 0, TAXON + ";s__y": 0})]},
     422, "microbiome.counts"),
    ("100,000 taxa", lambda p: {"patients": [_with(p, "microbiome.counts", {
        f"{TAXON};s__sp{i}": 1 for i in range(100_000)})]}, 422, "microbiome.counts"),
    ("a 2,000-character lineage", lambda p: {"patients": [_with(
        p, "microbiome.counts", {TAXON + ";s__" + "x" * 2000: 5})]}, 422,
     "microbiome.counts[#0]"),
    ("a value-bearing unknown field", lambda p: {"patients": [_with(
        p, "clinical.full_name", SECRET)]}, 422, "clinical[#"),
    ("an id in a bleeding score", lambda p: {"patients": [_with(_with(
        p, "clinical.bleeding_scale", "ITP-BAT"), "clinical.bleeding_score", SECRET)]}, 422,
     "clinical"),
    ("duplicate ids", lambda p: {"patients": [p, p]}, 422, "patient_id"),
    ("an id too long", lambda p: {"patients": [_with(p, "patient_id", SECRET * 20)]}, 422,
     "patient_id"),
    ("no patients", lambda p: {"patients": []}, 422, "patients"),
    ("more patients than ITP_MAX_BATCH", lambda p: {"patients": [
        {**p, "patient_id": f"p{i}"} for i in range(1001)]}, 422, "patients"),
    ("a list body", lambda p: [p], 422, "body"),
    ("deep nesting", lambda p: b"[" * 100_000 + b"]" * 100_000, 400, "body"),
    ("truncated JSON", lambda p: json.dumps({"patients": [p]}).encode()[:-7], 400, "body"),
    ("not UTF-8", lambda p: b'{"patients": [{"patient_id": "\xff\xfe"}]}', 400, "body"),
    ("oversized body", lambda p: b'{"patients": [' + b" " * (17 * MIB) + b"]}", 413,
     "body"),
]


@pytest.mark.parametrize(("name", "body", "status", "field"), CORPUS,
                         ids=[c[0] for c in CORPUS])
def test_bad_input_gets_a_clear_4xx_and_the_service_stays_healthy(
        client: TestClient, patient: dict[str, Any], name: str, body: Any, status: int,
        field: str | None) -> None:
    secret_patient = _with(patient, "patient_id", SECRET)
    response = _post(client, body(secret_patient))
    assert response.status_code == status, response.text
    problems = response.json()["detail"]
    assert problems and all(p["message"] for p in problems)
    assert any(p["field"].startswith(field) for p in problems), problems
    assert "1e308" not in response.text and "Infinity" not in response.text
    assert SECRET * 4 not in response.text  # ids come back truncated to 64, values never
    if name in ("a value-bearing unknown field", "an id in a bleeding score"):
        assert all(SECRET not in p["message"] and SECRET not in p["field"] for p in problems)
    assert client.get("/health").status_code == 200
    assert _post(client, {"patients": [patient]}).status_code == 200


def test_wrong_content_types_are_415(client: TestClient, patient: dict[str, Any]) -> None:
    body = json.dumps({"patients": [patient]})
    for content_type in ("text/plain", "application/x-www-form-urlencoded", ""):
        response = client.post("/v1/predict", content=body,
                               headers={"content-type": content_type})
        assert response.status_code == 415, content_type
        assert "application/json" in response.json()["detail"][0]["message"]


def test_a_streamed_body_over_the_limit_is_cut_off_with_413(client: TestClient) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"patients": ['
        for _ in range(300):
            yield b" " * 65536

    response = client.post("/v1/predict", content=chunks(),
                           headers={"content-type": "application/json"})
    assert response.status_code == 413


def test_json_errors_give_line_and_column(client: TestClient) -> None:
    response = _post(client, b'{"patients": [\n  {"patient_id": "a",}\n]}')
    assert response.status_code == 400
    assert "line 2 column" in response.json()["detail"][0]["message"]


def test_problems_name_patient_index_and_truncated_id(client: TestClient,
                                                      patient: dict[str, Any]) -> None:
    long_id = "P" * 128
    patients = [patient, _with(_with(patient, "patient_id", long_id), "clinical.age_years", -3)]
    problem = _post(client, {"patients": patients}).json()["detail"][0]
    assert problem["patient_index"] == 1
    assert problem["patient_id"] == "P" * 64 + "…"
    assert problem["field"] == "clinical.age_years"


def test_the_same_patient_gets_the_same_answer_alone_or_in_any_batch(
        client: TestClient, trained: Trained) -> None:
    patients, _ = patients_from_cohort(trained.data, 12)
    alone = {p["patient_id"]: _post(client, {"patients": [p]}).json()["predictions"][0]
             for p in patients}
    for batch in (patients, patients[::-1], patients[3:9]):
        for prediction in _post(client, {"patients": batch}).json()["predictions"]:
            _assert_same(prediction, alone[prediction["patient_id"]])


def _assert_same(got: Any, expected: Any) -> None:
    """Equal, numbers to 1e-12 (a batch's matrix products may round in another order)."""
    if isinstance(expected, dict):
        assert set(got) == set(expected)
        for key in expected:
            _assert_same(got[key], expected[key])
    elif isinstance(expected, list):
        assert len(got) == len(expected)
        for a, b in zip(got, expected, strict=True):
            _assert_same(a, b)
    elif isinstance(expected, float):
        assert got == pytest.approx(expected, rel=1e-12, abs=1e-12)
    else:
        assert got == expected


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_memory_stays_bounded_after_a_burst_of_large_requests(
        client: TestClient, patient: dict[str, Any]) -> None:
    """Lineages clients send are parsed through bounded caches: a burst of never-seen long
    keys cannot grow the process."""
    before = _rss_mib()
    for burst in range(12):
        counts = {f"{TAXON};s__{'q' * 800}{burst}_{i}": 3 for i in range(4000)}
        response = _post(client, {"patients": [_with(patient, "microbiome.counts", counts)]})
        assert response.status_code == 200, response.text[:300]
    for cached in (parse_lineage, lineage_at_rank, taxon_key):
        assert cached.cache_info().currsize <= cached.cache_info().maxsize
    assert _rss_mib() - before < 300  # 48,000 distinct ~1 KB keys went through


def test_openapi_says_exactly_what_is_accepted(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    operation = spec["paths"]["/v1/predict"]["post"]
    assert {"200", "400", "413", "415", "422", "503"} <= set(operation["responses"])
    assert "401" not in operation["responses"] and "security" not in operation  # open
    schemas = spec["components"]["schemas"]
    counts = schemas["Microbiome"]["properties"]["counts"]
    assert counts["minProperties"] == 1 and counts["maxProperties"] == 5000
    assert counts["propertyNames"]["pattern"].endswith("__")
    assert counts["additionalProperties"]["minimum"] == 0
    request = schemas["PredictRequest"]
    assert request["properties"]["patients"]["maxItems"] == 1000
    example = request["examples"][0]
    assert _post(client, example).status_code == 200  # the documented example works


# --- API keys --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keyed(trained: Trained, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    secrets = tmp_path_factory.mktemp("secrets") / "keys"
    secrets.write_text("# rotated in March\nfile-key-2\n")
    with serving(Settings(model_uri=str(trained.bundle), api_keys=f"{KEY},second-key",
                          api_keys_file=secrets, admin_token="admin-key",
                          tracking_uri=None)) as client:
        yield client


def test_api_keys_guard_v1_and_leave_probes_open(keyed: TestClient,
                                                 patient: dict[str, Any]) -> None:
    body = {"patients": [patient]}
    assert keyed.get("/health").status_code == 200 and keyed.get("/ready").status_code == 200
    refused = [_post(keyed, body), _post(keyed, body, authorization="Bearer wrong"),
               _post(keyed, body, **{"x-api-key": KEY[:-1]}),
               keyed.get("/v1/model", headers={"authorization": "Basic " + KEY})]
    assert {r.status_code for r in refused} == {401}
    assert len({r.text for r in refused}) == 1  # never says which part was wrong
    for headers in ({"authorization": f"Bearer {KEY}"}, {"x-api-key": "second-key"},
                    {"x-api-key": "file-key-2"}):
        assert _post(keyed, body, **headers).status_code == 200
        assert keyed.get("/v1/model", headers=headers).status_code == 200


def test_openapi_documents_the_keys_when_there_are_some(keyed: TestClient) -> None:
    spec = keyed.get("/openapi.json").json()
    assert {"HTTPBearer", "APIKeyHeader"} <= set(spec["components"]["securitySchemes"])
    for path in ("/v1/predict", "/v1/model"):
        operation = next(iter(spec["paths"][path].values()))
        assert "401" in operation["responses"] and operation["security"]
    assert "security" not in spec["paths"]["/health"]["get"]


def test_reload_needs_its_own_key(keyed: TestClient) -> None:
    url = "/v1/model/reload"
    assert keyed.post(url, headers={"authorization": f"Bearer {KEY}"}).status_code == 401
    response = keyed.post(url, headers={"authorization": "Bearer admin-key"})
    assert response.status_code == 200 and response.json()["integrity"] == "self-attested"


def test_reload_is_off_without_an_admin_key(client: TestClient) -> None:
    assert client.post("/v1/model/reload",
                       headers={"authorization": "Bearer anything"}).status_code == 403


def test_no_keys_is_a_loud_warning(trained: Trained, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    logger = logging.getLogger("service")
    logger.addHandler(caplog.handler)
    try:
        create_app(Settings(model_uri=str(trained.bundle), tracking_uri=None))
    finally:
        logger.removeHandler(caplog.handler)
    assert any("NO API KEYS" in r.getMessage() and r.levelname == "WARNING"
               for r in caplog.records)


# --- loading and integrity -------------------------------------------------------------------


def test_health_answers_while_the_registry_hangs(trained: Trained) -> None:
    """The first load runs in the background: probes answer while it is stuck, and /ready
    says it is loading."""
    release = threading.Event()

    def stuck(settings: Settings) -> LoadedModel:
        release.wait(30)
        return load_model(settings)

    settings = Settings(model_uri=str(trained.bundle), tracking_uri=None)
    with serving(settings, ModelSlot(settings, stuck), ready=False) as client:
        started = time.monotonic()
        assert client.get("/health").json() == {"status": "ok"}
        assert time.monotonic() - started < 5  # not waiting for the 30 s load
        ready = client.get("/ready")
        assert ready.status_code == 503 and ready.json()["reason"] == "loading"
        assert client.get("/v1/model").status_code == 503
        release.set()
        deadline = time.monotonic() + 60
        while client.get("/ready").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)


def test_a_missing_sqlite_store_is_an_error_not_a_new_database(tmp_path: Path) -> None:
    store = tmp_path / "typo.db"
    settings = Settings(model_uri="models:/itp-response@champion",
                        tracking_uri=f"sqlite:///{store}")
    with serving(settings, ready=False) as client:
        deadline = time.monotonic() + 30
        while not (body := client.get("/ready").json())["last_failure"]:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert body["reason"] == "load_failed"  # public: a code, never the store's path
        assert body["last_failure"]["attempts"] >= 1
        assert body["last_failure"]["next_attempt_in_s"] is not None  # retried with backoff
        details = client.get("/v1/model")  # behind the key (none here): the whole reason
        assert details.status_code == 503
        assert "no such database file" in details.json()["last_failure"]["error"]
    assert not store.exists()


def _tamper(bundle: Path) -> None:
    """Edit MLmodel and rewrite bundle.json's digest to match: the attack a self-recorded
    digest cannot see."""
    mlmodel = bundle / "MLmodel"
    mlmodel.write_text(mlmodel.read_text() + "\n# edited\n")
    info = json.loads((bundle / registry.BUNDLE_FILE).read_text())
    info[registry.DIGEST_TAG] = registry.digest(bundle)
    (bundle / registry.BUNDLE_FILE).write_text(json.dumps(info))


def _keypair(directory: Path) -> tuple[Path, Path]:
    key = Ed25519PrivateKey.generate()
    private, public = directory / "signing.pem", directory / "signing.pub.pem"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


def test_bundle_integrity_against_signature_registry_and_pin(trained: Trained,
                                                             tmp_path: Path) -> None:
    private, public = _keypair(tmp_path)
    bundle = tmp_path / "bundle"
    shutil.copytree(trained.bundle, bundle)
    info = json.loads((bundle / registry.BUNDLE_FILE).read_text())
    digest = info[registry.DIGEST_TAG]

    with pytest.raises(registry.ModelIntegrityError, match="unsigned bundle"):
        registry.load(str(bundle), public_key=public)
    (bundle / registry.SIGNATURE_FILE).write_text(registry.sign(info, private))
    assert registry.load(str(bundle), public_key=public).integrity == "signed"
    assert registry.load(str(bundle)).integrity == "self-attested"
    assert registry.load(str(bundle), expected_sha256=digest).integrity == "pinned"
    import mlflow

    mlflow.set_tracking_uri(trained.tracking_uri)
    assert registry.load(str(bundle), check_registry=True).integrity == "registry"

    _tamper(bundle)
    registry.load(str(bundle))  # only its own record: still loads, and says so
    # /ready's public reason is the error's kind, never its text (which names paths)
    with pytest.raises(registry.ModelIntegrityError, match="signature does not verify") as e:
        registry.load(str(bundle), public_key=public)
    assert reason_code(e.value) == "signature_invalid"
    with pytest.raises(registry.ModelIntegrityError, match="not the one registered") as e:
        registry.load(str(bundle), check_registry=True)
    assert reason_code(e.value) == "digest_mismatch"
    with pytest.raises(registry.ModelIntegrityError, match="pinned digest") as e:
        registry.load(str(bundle), expected_sha256=digest)
    assert reason_code(e.value) == "digest_mismatch"
    forged = base64.b64encode(b"\0" * 64).decode()
    (bundle / registry.SIGNATURE_FILE).write_text(forged)
    with pytest.raises(registry.ModelIntegrityError, match="signature does not verify") as e:
        registry.load(str(bundle), public_key=public)
    assert reason_code(e.value) == "signature_invalid"


def test_exported_bundles_are_readable_by_the_service_user(trained: Trained) -> None:
    modes = {path.name: path.stat().st_mode & 0o777 for path in trained.bundle.rglob("*")}
    assert trained.bundle.stat().st_mode & 0o777 == 0o755
    assert modes and all(mode == 0o644 for mode in modes.values()), modes


# --- metrics ---------------------------------------------------------------------------------


def _samples(client: TestClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith(
        "text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(response.text)
            for s in family.samples}


def test_metrics_count_requests_patients_explanations_warnings_and_loads(
        client: TestClient, patient: dict[str, Any]) -> None:
    before = _samples(client)
    unknown = _with(patient, f"microbiome.counts.{TAXON};s__unknownspecies_zz", 10)
    unknown["microbiome"]["counts"]["d__Bacteria;p__Firmicutes;g__Novelgenus"] = 100
    assert _post(client, {"patients": [patient, {**unknown, "patient_id": "other"}]}
                 ).status_code == 200
    assert _post(client, {"patients": [patient]} | {"explain": False}).status_code == 200
    assert _post(client, b"{").status_code == 400
    after = _samples(client)

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    ok = {"route": "/v1/predict", "method": "POST", "status": "200"}
    assert delta("itp_http_requests_total", **ok) == 2
    assert delta("itp_http_requests_total", **(ok | {"status": "400"})) == 1
    assert delta("itp_http_request_duration_seconds_count", route="/v1/predict",
                 method="POST") == 3
    assert delta("itp_patients_scored_total") == 3
    assert delta("itp_explanations_total") == 2
    assert delta("itp_prediction_warnings_total", code="unknown_taxa") == 1
    assert after[("itp_model_loads_total", (("outcome", "loaded"),))] >= 1
    served = [labels for (name, labels), value in after.items()
              if name == "itp_model_info" and value == 1]
    assert served and dict(served[0])["version"] == "1"
    text = client.get("/metrics").text
    assert "other" not in text and "Novelgenus" not in text  # never a patient's data


def test_a_strange_http_method_never_becomes_a_metric_label(client: TestClient) -> None:
    assert client.request("BREW", "/health").status_code == 405
    assert 'method="BREW"' not in client.get("/metrics").text
    assert 'method="OTHER"' in client.get("/metrics").text


def test_keys_are_checked_before_anything_else(trained: Trained, tmp_path: Path) -> None:
    """Without a key, a caller learns nothing: 401 even while no model is loaded."""
    release = threading.Event()

    def stuck(settings: Settings) -> LoadedModel:
        release.wait(30)
        return load_model(settings)

    settings = Settings(model_uri=str(trained.bundle), tracking_uri=None, api_keys=KEY)
    with serving(settings, ModelSlot(settings, stuck), ready=False) as client:
        assert client.get("/v1/model").status_code == 401
        assert client.post("/v1/predict", content=b"{}").status_code == 401
        unready = client.get("/v1/model", headers={"x-api-key": KEY})
        assert unready.status_code == 503 and "/ready" in unready.json()["detail"]
        release.set()


def test_an_empty_keys_file_refuses_to_start(trained: Trained, tmp_path: Path) -> None:
    empty = tmp_path / "keys"
    empty.write_text("  # not mounted yet\n\n")
    with pytest.raises(ValueError, match="holds no key"):
        create_app(Settings(model_uri=str(trained.bundle), tracking_uri=None,
                            api_keys_file=empty))


def test_a_signing_key_refuses_registry_uris(trained: Trained, tmp_path: Path) -> None:
    _, public = _keypair(tmp_path)
    settings = Settings(model_uri="models:/itp-response@champion",
                        tracking_uri=trained.tracking_uri, bundle_public_key=public)
    with pytest.raises(registry.ModelIntegrityError, match="only signed bundles"):
        load_model(settings)
