"""Operating the service: structured logs that never hold what a client sent, responses that
name the model that answered, and a SIGTERM that drains requests in flight.

In process (TestClient, the app's own log handler read through capsys) and over real HTTP
(`itp-serve` and `uvicorn service.app:app` subprocesses, their stderr read back), on the
bundle the e2e training exported.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY

from service.app import create_app
from service.loading import ModelSlot
from service.model import LoadedModel, load_model
from service.settings import Settings
from tests.conftest import BIN, MODEL, Server, Trained, start_server, stop_server
from tests.test_e2e import patients_from_cohort
from tests.test_service import CORPUS, KEY, MIB, SECRET, TAXON, _post, _with, serving
from training.bundle import StoredModel

pytestmark = pytest.mark.e2e

# what a corpus request may carry that a log must never hold (numbers too distinctive to
# turn up in a latency by chance)
SENT = (SECRET, KEY, TAXON, "Faecalibacterium", "1e308", "1e+308", "1e400", "Infinity")


def _records(text: str) -> list[dict[str, Any]]:
    """Every line of a log as JSON: a line that is not one fails here."""
    records = []
    for line in text.splitlines():
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                pytest.fail(f"not a JSON log line: {line[:300]}")
    return records


def _access(records: list[dict[str, Any]], request_id: str) -> list[dict[str, Any]]:
    return [r for r in records if r["logger"] == "service.access"
            and r.get("request_id") == request_id]


def _leaks(records: list[dict[str, Any]], values: tuple[str, ...]) -> list[str]:
    """Values sent that appear in any record (the test client's own httpx lines aside:
    they are the client's log, not the service's)."""
    text = "\n".join(json.dumps(r, ensure_ascii=False) for r in records
                     if r["logger"] != "httpx")
    return [value for value in values if value in text]


@pytest.fixture(scope="module")
def keyed(trained: Trained) -> Iterator[TestClient]:
    with serving(Settings(model_uri=str(trained.bundle), max_body_bytes=16 * MIB,
                          api_keys=KEY, tracking_uri=None, admin_token=None,
                          log_format="json")) as client:
        yield client


@pytest.fixture(scope="module")
def patient(trained: Trained) -> dict[str, Any]:
    patients, _ = patients_from_cohort(trained.data, 1)
    return patients[0]


def _sent(patient: dict[str, Any]) -> tuple[str, ...]:
    return (*SENT, *patient["microbiome"]["counts"])


# --- logs ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "body", "status", "field"), CORPUS,
                         ids=[c[0] for c in CORPUS])
def test_each_bad_request_logs_one_json_access_record_and_nothing_it_sent(
        keyed: TestClient, patient: dict[str, Any], capsys: pytest.CaptureFixture[str],
        name: str, body: Callable[[dict[str, Any]], Any], status: int,
        field: str | None) -> None:
    capsys.readouterr()
    request_id = f"corpus-{[case[0] for case in CORPUS].index(name)}"
    response = _post(keyed, body(_with(patient, "patient_id", SECRET)),
                     **{"x-api-key": KEY, "x-request-id": request_id})
    assert response.status_code == status
    assert response.headers["x-request-id"] == request_id
    records = _records(capsys.readouterr().err)
    (access,) = _access(records, request_id)
    assert access["status"] == status and access["route"] == "/v1/predict"
    assert access["method"] == "POST" and access["latency_ms"] >= 0
    assert access["level"] == "INFO"
    if status == 413:  # refused by the body limit, before the key check: no model named
        assert "model_version" not in access and "x-model-version" not in response.headers
    else:
        assert access["model_version"] == "1"
    assert "patients" not in access  # nobody was scored
    assert not _leaks(records, _sent(patient))


def test_a_scored_request_logs_the_model_and_patient_count(
        keyed: TestClient, trained: Trained, capsys: pytest.CaptureFixture[str]) -> None:
    patients, _ = patients_from_cohort(trained.data, 3)
    capsys.readouterr()
    response = _post(keyed, {"patients": patients}, **{"x-api-key": KEY})
    assert response.status_code == 200
    request_id = response.headers["x-request-id"]
    records = _records(capsys.readouterr().err)
    (access,) = _access(records, request_id)
    assert access["patients"] == 3 and access["status"] == 200
    assert (access["model_name"], access["model_version"]) == (MODEL, "1")
    sent = (*_sent(patients[0]), *(p["patient_id"] for p in patients), KEY)
    assert not _leaks(records, sent)


def test_no_query_string_header_or_unsafe_request_id_reaches_the_log(
        keyed: TestClient, patient: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    unsafe: list[str | bytes] = ["x" * 65, "has space", "<script>", "id;DROP",
                                 "\u00e9t\u00e9".encode()]
    capsys.readouterr()
    for value in unsafe:
        response = keyed.post(f"/v1/predict?patient={SECRET}",
                              content=json.dumps({"patients": [patient]}).encode("utf-8"),
                              headers={"content-type": "application/json",
                                       "authorization": f"Bearer {KEY}",
                                       "x-request-id": value, "x-patient-name": SECRET})
        assert response.status_code == 200
        replaced = response.headers["x-request-id"]
        assert replaced != value and len(replaced) == 32  # a fresh uuid4
    records = _records(capsys.readouterr().err)
    access = [r for r in records if r["logger"] == "service.access"]
    assert len(access) == len(unsafe) and {r["route"] for r in access} == {"/v1/predict"}
    assert not _leaks(records, (*_sent(patient), patient["patient_id"], "x" * 65, "has space",
                                  "<script>", "id;DROP", "\u00e9"))


def test_text_logs_for_a_terminal(trained: Trained, capsys: pytest.CaptureFixture[str]) -> None:
    settings = Settings(model_uri=str(trained.bundle), tracking_uri=None, log_format="text")
    with TestClient(create_app(settings, ModelSlot(settings, _never))) as client:
        capsys.readouterr()
        client.get("/health", headers={"x-request-id": "term-1"})
        lines = [line for line in capsys.readouterr().err.splitlines() if "term-1" in line]
    assert len(lines) == 1 and not lines[0].startswith("{")
    assert "service.access: GET /health 200" in lines[0] and "request_id=term-1" in lines[0]


def _never(settings: Settings) -> LoadedModel:
    raise RuntimeError("not loading in this test")


def test_an_unexpected_error_is_a_500_with_a_request_id_logged_without_its_message(
        trained: Trained, capsys: pytest.CaptureFixture[str]) -> None:
    """An exception's message may quote the input: the log keeps its type and stack."""
    settings = Settings(model_uri=str(trained.bundle), tracking_uri=None, log_format="json")
    app = create_app(settings, ModelSlot(settings, _never))

    @app.get("/v1/boom")
    def boom() -> None:
        raise ValueError(f"cannot score patient {SECRET}")

    with TestClient(app, raise_server_exceptions=False) as client:
        capsys.readouterr()
        response = client.get("/v1/boom", headers={"x-request-id": "boom-1"})
        records = _records(capsys.readouterr().err)
    assert response.status_code == 500 and response.headers["x-request-id"] == "boom-1"
    assert "X-Request-ID" in response.json()["detail"]
    (access,) = _access(records, "boom-1")
    assert (access["level"], access["status"], access["route"]) == ("ERROR", 500, "/v1/boom")
    assert access["error"]["type"] == "builtins.ValueError"
    assert "in boom" in access["error"]["stack"]
    assert not _leaks(records, (SECRET,))


def _stand_in(version: str = "1") -> LoadedModel:
    """A model object for tests that never score: what headers and records name."""
    stored = StoredModel(model=None, name=MODEL, version=version,  # type: ignore[arg-type]
                         run_id="run", source="models:/itp-response@champion",
                         digest="0" * 64, metadata={})
    return LoadedModel(stored=stored, compiled=None)  # type: ignore[arg-type]


def test_a_client_gone_mid_upload_is_a_499_at_info_with_nothing_sent(
        capsys: pytest.CaptureFixture[str]) -> None:
    """Starlette's ClientDisconnect from request.body(): not a 500, no stack, no re-raise
    (uvicorn would log "Exception in ASGI application"), counted as 499."""
    settings = Settings(model_uri="models:/itp-response@champion", tracking_uri=None,
                        log_format="json")
    slot = ModelSlot(settings, _never)
    slot.model = _stand_in()
    app = create_app(settings, slot)
    sent: list[dict[str, Any]] = []
    messages = iter([{"type": "http.request", "body": b'{"patients": [', "more_body": True},
                     {"type": "http.disconnect"}])

    async def receive() -> dict[str, Any]:
        return next(messages, {"type": "http.disconnect"})

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/predict",
             "raw_path": b"/v1/predict", "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"),
                         (b"x-request-id", b"gone-1")],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    before = REGISTRY.get_sample_value("itp_http_requests_total", {
        "route": "/v1/predict", "method": "POST", "status": "499"}) or 0.0
    capsys.readouterr()
    asyncio.run(app(scope, receive, send))  # returns: nothing re-raised
    records = _records(capsys.readouterr().err)
    assert sent == []  # nobody to answer
    (access,) = _access(records, "gone-1")
    assert (access["level"], access["status"]) == ("INFO", 499) and "error" not in access
    assert not [r for r in records if r["level"] in ("ERROR", "WARNING")]
    assert REGISTRY.get_sample_value("itp_http_requests_total", {
        "route": "/v1/predict", "method": "POST", "status": "499"}) == before + 1
    assert not REGISTRY.get_sample_value("itp_http_requests_total", {
        "route": "/v1/predict", "method": "POST", "status": "500"})


def test_ready_is_coarse_and_the_reasons_are_behind_the_key() -> None:
    """/ready is public: ready or not, a reason code, name and version; an error message
    (registry URL, host, file path) only in /v1/model, with a key."""
    def failing(settings: Settings) -> LoadedModel:
        raise RuntimeError("cannot reach http://registry.internal:5000 for /srv/secret/m.db")

    settings = Settings(model_uri="models:/itp-response@champion", tracking_uri=None,
                        api_keys=KEY)
    with serving(settings, ModelSlot(settings, failing), ready=False) as client:
        deadline = time.monotonic() + 30
        while not (ready := client.get("/ready")).json()["last_failure"]:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert ready.status_code == 503
        assert ready.json()["reason"] == "load_failed"
        assert "registry.internal" not in ready.text and "/srv/secret" not in ready.text
        assert client.get("/v1/model").status_code == 401
        details = client.get("/v1/model", headers={"x-api-key": KEY})
        assert details.status_code == 503
        assert "registry.internal" in details.json()["last_failure"]["error"]
    slot = ModelSlot(settings, _never)
    slot.model = _stand_in("7")
    with TestClient(create_app(settings, slot)) as client:
        ready = client.get("/ready")
        assert ready.status_code == 200
        assert ready.json() == {"status": "ready", "reason": "serving",
                                "model": {"name": MODEL, "version": "7",
                                          "alias": "champion"},
                                "last_reload_failure": None}


def test_no_model_is_named_to_a_caller_without_a_key() -> None:
    """Only the model a request took after the key check is named: not on a 413 from the
    body limit (which runs before the key check), a 405 or a 401."""
    settings = Settings(model_uri="models:/itp-response@champion", tracking_uri=None,
                        api_keys=KEY, max_body_bytes=1024)
    slot = ModelSlot(settings, _never)
    slot.model = _stand_in()
    with TestClient(create_app(settings, slot)) as client:
        answers = [_post(client, b"x" * 4096), client.get("/v1/predict"),
                   _post(client, {"patients": []}), client.get("/v1/model")]
        assert [a.status_code for a in answers] == [413, 405, 401, 401]
        for answer in answers:
            assert not [h for h in answer.headers if h.startswith("x-model-")], (
                answer.status_code, answer.headers)
        keyed = client.post("/v1/predict", content=b"{}", headers={"x-api-key": KEY})
        assert keyed.status_code == 415  # took the model after the key check: named
        assert keyed.headers["x-model-version"] == "1"


# --- every response names the model ---------------------------------------------------------


def test_v1_responses_name_the_model_in_headers_and_body(
        keyed: TestClient, patient: dict[str, Any]) -> None:
    auth = {"x-api-key": KEY}
    scored = _post(keyed, {"patients": [patient]}, **auth)
    body = scored.json()["model"]
    assert body["name"] == MODEL and body["version"] == "1"
    assert body["alias"] is None  # a bundle path, not models:/<name>@<alias>
    for response in (scored, keyed.get("/v1/model", headers=auth),
                     _post(keyed, {"patients": []}, **auth), _post(keyed, b"{", **auth),
                     keyed.post("/v1/predict", content=b"{}", headers=auth)):  # 200 ... 415
        assert response.headers["x-model-name"] == MODEL, response.status_code
        assert response.headers["x-model-version"] == "1"
        assert "x-model-alias" not in response.headers
    refused = _post(keyed, {"patients": [patient]})  # no key: learns nothing
    assert refused.status_code == 401 and "x-model-name" not in refused.headers
    assert "x-model-name" not in keyed.get("/health").headers


def test_alias_is_named_when_served_through_one(registry_server: Server,
                                                trained: Trained) -> None:
    patients, _ = patients_from_cohort(trained.data, 1)
    response = httpx.post(f"{registry_server.url}/v1/predict", json={"patients": patients},
                          timeout=60)
    version = str(trained.result["registered_version"])
    assert response.json()["model"]["alias"] == "champion"
    info = httpx.get(f"{registry_server.url}/v1/model", timeout=30)
    assert info.json()["alias"] == "champion"
    for answered in (response, info):
        assert answered.headers["x-model-name"] == MODEL
        assert answered.headers["x-model-version"] == version
        assert answered.headers["x-model-alias"] == "champion"
    # `uvicorn service.app:app` logs in JSON too, one access record and no uvicorn one
    records = _records(registry_server.output())
    (access,) = _access(records, response.headers["x-request-id"])
    assert access["model_alias"] == "champion" and access["patients"] == 1
    assert not [r for r in records if r["logger"] == "uvicorn.access"]


class _Gated:
    """A compiled model whose scoring waits for the test: a swap happens mid-request."""

    def __init__(self, compiled: Any) -> None:
        self.compiled = compiled
        self.scoring = threading.Event()
        self.release = threading.Event()

    def score(self, *args: Any, **kwargs: Any) -> Any:
        self.scoring.set()
        assert self.release.wait(30)
        return self.compiled.score(*args, **kwargs)


def test_headers_name_the_model_that_scored_even_if_it_was_swapped_meanwhile(
        trained: Trained, patient: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    settings = Settings(model_uri=str(trained.bundle), tracking_uri=None, log_format="json")
    slot = ModelSlot(settings, _never)
    app = create_app(settings, slot)
    real = load_model(settings)
    gate = _Gated(real.compiled)
    old = replace(real, compiled=gate)
    new = replace(real, stored=replace(real.stored, version="2"))
    slot.model = old  # served from the start: the loader has nothing to do
    with TestClient(app) as client:
        answers: list[httpx.Response] = []
        request = threading.Thread(target=lambda: answers.append(
            _post(client, {"patients": [patient]}, **{"x-request-id": "swapped"})))
        request.start()
        assert gate.scoring.wait(30)
        slot.model = new  # a reload's swap, while version 1 is scoring
        gate.release.set()
        request.join(60)
        (response,) = answers
        assert response.status_code == 200
        assert response.headers["x-model-version"] == "1"
        assert response.json()["model"]["version"] == "1"
        (access,) = _access(_records(capsys.readouterr().err), "swapped")
        assert access["model_version"] == "1"
        assert _post(client, {"patients": [patient]}).headers["x-model-version"] == "2"


# --- graceful shutdown -----------------------------------------------------------------------


def test_lifespan_shutdown_stops_the_loader_thread(trained: Trained) -> None:
    """A model that never loads keeps the loader retrying; stopping the app ends it."""
    threads: list[threading.Thread] = []

    def failing(settings: Settings) -> LoadedModel:
        threads.append(threading.current_thread())
        raise RuntimeError("registry down")

    settings = Settings(model_uri=str(trained.bundle), tracking_uri=None)
    with TestClient(create_app(settings, ModelSlot(settings, failing))) as client:
        deadline = time.monotonic() + 30
        while not threads:
            assert time.monotonic() < deadline, "the loader never ran"
            time.sleep(0.01)
        assert client.get("/ready").status_code == 503
    (loader,) = set(threads)
    loader.join(10)
    assert not loader.is_alive()


def _raw_request(port: int, body: bytes, request_id: str) -> socket.socket:
    """POST /v1/predict with `Expect: 100-continue`, headers only: the server answers
    100 Continue once the endpoint reads the body, so the request is then in flight."""
    connection = socket.create_connection(("127.0.0.1", port), timeout=60)
    connection.sendall(
        b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\nExpect: 100-continue\r\n"
        + f"X-Request-ID: {request_id}\r\nContent-Length: {len(body)}\r\n\r\n".encode())
    interim = connection.recv(1024)
    assert interim.startswith(b"HTTP/1.1 100"), interim
    return connection


def _read_response(connection: socket.socket) -> tuple[int, dict[str, str], bytes]:
    data = b""
    while chunk := connection.recv(65536):  # the server closes the connection: draining
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in header_lines)
    return int(status_line.split()[1]), headers, body


def test_sigterm_drains_a_request_in_flight_then_exits_0(trained: Trained) -> None:
    env = trained.env(ITP_MODEL_URI=str(trained.bundle), ITP_SHUTDOWN_GRACE_SECONDS="60")
    env.pop("MLFLOW_TRACKING_URI")
    server = start_server([str(BIN / "itp-serve")], env, cwd=trained.workdir,
                          log=trained.workdir / "drain-server.log")
    try:
        port = int(server.url.rsplit(":", 1)[1])
        patients, _ = patients_from_cohort(trained.data, 200)
        body = json.dumps({"patients": patients, "explain": True}).encode()
        connection = _raw_request(port, body, "in-flight")
        server.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        while True:  # shutting down: the listening socket closes while the request waits
            assert time.monotonic() < deadline, "the server kept accepting connections"
            try:
                httpx.get(f"{server.url}/health", timeout=2)
            except httpx.TransportError:
                break
            time.sleep(0.05)
        assert server.process.poll() is None  # still running: draining
        connection.sendall(body)
        status, headers, answer = _read_response(connection)
        connection.close()
        assert status == 200, answer[:500]
        assert len(json.loads(answer)["predictions"]) == 200
        assert headers["x-request-id"] == "in-flight" and headers["x-model-version"] == "1"
        assert server.process.wait(timeout=60) == 0
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{server.url}/health", timeout=2)
        records = _records(server.output())
        (access,) = _access(records, "in-flight")
        assert access["status"] == 200 and access["patients"] == 200
    finally:
        if server.process.poll() is None:
            stop_server(server)


# --- over real HTTP: itp-serve's own log ----------------------------------------------------


@pytest.fixture(scope="module")
def json_server(trained: Trained) -> Iterator[Server]:
    env = trained.env(ITP_MODEL_URI=str(trained.bundle), ITP_API_KEYS=KEY,
                      ITP_MAX_BODY_BYTES=str(16 * MIB))
    env.pop("MLFLOW_TRACKING_URI")
    env.pop("ITP_LOG_FORMAT", None)  # JSON is the default
    server = start_server([str(BIN / "itp-serve")], env, cwd=trained.workdir,
                          log=trained.workdir / "json-server.log")
    yield server
    stop_server(server)


def test_itp_serve_logs_the_corpus_as_json_with_one_access_record_each(
        json_server: Server, trained: Trained, patient: dict[str, Any]) -> None:
    secret_patient = _with(patient, "patient_id", SECRET)
    expected = {}
    for index, (_, body, status, _) in enumerate(CORPUS):
        built = body(secret_patient)
        content = built if isinstance(built, bytes) else json.dumps(
            built, allow_nan=True).encode()
        request_id = f"http-{index}"
        response = httpx.post(f"{json_server.url}/v1/predict", content=content, timeout=60,
                              headers={"content-type": "application/json",
                                       "authorization": f"Bearer {KEY}",
                                       "x-request-id": request_id})
        assert response.status_code == status
        assert response.headers["x-request-id"] == request_id
        expected[request_id] = status
    stop_server(json_server)  # flushes and ends the log
    assert json_server.process.returncode == 0
    records = _records(json_server.output())
    for request_id, status in expected.items():
        (access,) = _access(records, request_id)
        assert access["status"] == status and access["route"] == "/v1/predict", access
    assert not _leaks(records, _sent(patient))
    assert not [r for r in records if r["logger"] == "uvicorn.access"]
    assert any(r["logger"] == "uvicorn.error" and "Started server process" in r["message"]
               for r in records)  # uvicorn's own records are JSON too


@pytest.mark.parametrize(("files", "expected"), [
    ({"cpu.max": "150000 100000\n"}, 2),  # cgroup v2, 1.5 CPUs: rounded up
    ({"cpu.max": "50000 100000\n"}, 1),
    ({"cpu.max": "max 100000\n"}, None),  # no limit: the affinity
    ({"cpu/cpu.cfs_quota_us": "100000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 1),  # v1
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
    ({}, None),
])
def test_thread_sizing_follows_the_container_cpu_quota(
        tmp_path: Path, files: dict[str, str], expected: int | None) -> None:
    from service.cli import available_cpus

    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    affinity = len(os.sched_getaffinity(0))
    assert available_cpus(tmp_path) == (affinity if expected is None else min(affinity,
                                                                              expected))
