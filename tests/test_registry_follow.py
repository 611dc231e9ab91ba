"""Following the alias against a real tracking server: `mlflow server` (SQLite, proxied
artifacts), two versions trained over HTTP by `itp-train`, and two services serving
models:/itp-response@champion, one polling, one woken only by MLflow's webhook, scoring
under concurrent load while the alias moves v1 -> v2 -> v1, then to a v3 whose golden
predictions do not reproduce (which both refuse, serving v1 on).

MLflow delivers the webhook itself (mlflow/webhooks/delivery.py): the tracking server gets
MLFLOW_WEBHOOK_ALLOWED_SCHEMES=http,https and MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS=true, because
its SSRF guard otherwise refuses plain-HTTP and loopback URLs (a deployment reaches the
service over HTTPS at a routable address instead), MLFLOW_WEBHOOK_CACHE_TTL=1 so the
webhook created after the first training is seen at once (MLflow caches the webhook list
per event for 60 s), and a fixed MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.conftest import BIN, MODEL, Server, free_port, run_cli, start_server, stop_server
from tests.test_e2e import patients_from_cohort

pytestmark = pytest.mark.e2e

SECRET = "registry-webhook-secret-" + "0" * 16  # ITP_WEBHOOK_SECRET: 32 characters or more
ALIAS_URI = f"models:/{MODEL}@champion"
# small and quick: the point is the registry, not the model (tests/conftest.py trains the
# demo-sized one). One rank, `both`, so genus and species side by side also go the whole way
# from the CLI through the registry to the golden check and answers over HTTP.
TRAIN = ("train", "--data", "data/cohort", "--experiment", MODEL, "--register", MODEL,
         "--preset", "fast", "--splits", "3", "--inner-splits", "2", "--permutations", "0",
         "--bootstrap", "100", "--rank", "both", "--jobs", "2")


@dataclass
class Tracking:
    url: str
    process: subprocess.Popen[bytes]
    workdir: Path

    def env(self, **extra: str) -> dict[str, str]:
        return {**os.environ, "MLFLOW_TRACKING_URI": self.url, **extra}


def wait_for(condition: Callable[[], bool], what: str, timeout: float) -> None:
    """A bounded wait for something another process does; fails with what it waited for."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"gave up after {timeout:.0f} s waiting: {what}"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def tracking(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tracking]:
    from cryptography.fernet import Fernet

    workdir = tmp_path_factory.mktemp("tracking")
    port = free_port()
    env = {**os.environ, "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https",
           "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true", "MLFLOW_WEBHOOK_CACHE_TTL": "1",
           "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": Fernet.generate_key().decode()}
    env.pop("MLFLOW_TRACKING_URI", None)
    with (workdir / "mlflow-server.log").open("wb") as log:
        process = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1", "--backend-store-uri", f"sqlite:///{workdir / 'mlflow.db'}",
             "--artifacts-destination", str(workdir / "artifacts"), "--serve-artifacts"],
            cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)  # its own process group: uvicorn runs as a child
    server = Tracking(f"http://127.0.0.1:{port}", process, workdir)
    # the cohort is simulated while the server starts
    run_cli("simulate", "--n-patients", "240", "--seed", "11", "--out", "data/cohort",
            cwd=workdir)

    def answers() -> bool:
        assert process.poll() is None, (workdir / "mlflow-server.log").read_text()[-3000:]
        try:
            return httpx.get(f"{server.url}/health", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_for(answers, "mlflow server to answer /health", 120)
        yield server
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


@dataclass
class Load:
    """Clients posting predictions to several services until stopped; every answer kept."""

    servers: dict[str, Server]
    patients: list[dict]
    answers: dict[str, list[tuple[int, str | None]]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self, per_server: int = 2) -> None:
        for name in self.servers:
            self.answers[name] = []
            for _ in range(per_server):
                thread = threading.Thread(target=self._client, args=(name,), daemon=True)
                thread.start()
                self.threads.append(thread)

    def _client(self, name: str) -> None:
        with httpx.Client(base_url=self.servers[name].url, timeout=30) as client:
            while not self.stop.is_set():
                try:
                    response = client.post("/v1/predict", json={"patients": self.patients,
                                                                 "explain": True})
                except httpx.HTTPError as error:
                    self.errors.append(f"{name}: {type(error).__name__}")
                    continue
                body = response.json() if response.status_code == 200 else {}
                version = body.get("model", {}).get("version")
                if response.headers.get("x-model-version", version) != version:
                    self.errors.append(f"{name}: X-Model-Version is not the body's version")
                self.answers[name].append((response.status_code, version))

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=60)

    def versions(self, name: str) -> list[str | None]:
        return [version for _, version in self.answers[name]]


def register_tampered_golden(client: object, version: str, workdir: Path) -> str:
    """A new registry version with `version`'s model and a golden probability off by 1e-6,
    registered with the digest of its files: it passes every integrity check and must be
    refused by the golden check alone."""
    import mlflow
    import yaml

    from training import registry

    files = registry.download(f"models:/{MODEL}/{version}", workdir / "tampered")
    mlmodel = yaml.safe_load((files / "MLmodel").read_text())
    golden = mlmodel["metadata"]["itp_response"]["golden"]
    golden["probability"][0] += 1e-6
    (files / "MLmodel").write_text(yaml.safe_dump(mlmodel, sort_keys=False))
    mlflow.set_experiment(MODEL)
    with mlflow.start_run(run_name="tampered-golden") as run:
        mlflow.log_artifacts(str(files), "model")
    created = client.create_model_version(  # type: ignore[attr-defined]
        MODEL, f"runs:/{run.info.run_id}/model", run.info.run_id,
        tags={registry.DIGEST_TAG: registry.digest(files)})
    return str(created.version)


def rejection(server: Server) -> dict | None:
    """The last failed reload with its full reason: in /v1/model (no keys set here); the
    public /ready has only a reason code."""
    return httpx.get(f"{server.url}/v1/model", timeout=5).json().get("last_reload_failure")


def served(server: Server) -> str | None:
    ready = httpx.get(f"{server.url}/ready", timeout=5).json()
    return (ready.get("model") or {}).get("version")


def test_services_follow_the_alias_under_load_by_polling_and_by_webhook(
        tracking: Tracking) -> None:
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(tracking.url)
    workdir = tracking.workdir
    run_cli(*TRAIN, "--alias", "champion", cwd=workdir, env=tracking.env())  # version 1
    run_cli(*TRAIN, "--alias", "", "--seed", "8", cwd=workdir, env=tracking.env())  # 2
    client = MlflowClient(tracking_uri=tracking.url)
    assert client.get_model_version_by_alias(MODEL, "champion").version == "1"

    serve = [str(BIN / "itp-serve")]
    polling = start_server(serve, tracking.env(ITP_MODEL_URI=ALIAS_URI, ITP_POLL_SECONDS="1"),
                           cwd=workdir, log=workdir / "polling.log")
    hooked = None
    load = None
    try:
        hooked = start_server(serve, tracking.env(ITP_MODEL_URI=ALIAS_URI,
                                                  ITP_POLL_SECONDS="0",
                                                  ITP_WEBHOOK_SECRET=SECRET),
                              cwd=workdir, log=workdir / "webhook.log")
        client.create_webhook(name="itp-serve", url=f"{hooked.url}/v1/webhooks/mlflow",
                              events=["model_version_alias.created"], secret=SECRET)
        assert served(polling) == served(hooked) == "1"
        info = httpx.get(f"{hooked.url}/v1/model", timeout=5).json()
        assert info["follow"]["poll_seconds"] is None and info["follow"]["webhook"]
        assert info["checks"] == {"compatible": "passed", "golden": "passed",
                                  "additive": "passed"}
        vocabulary = info["feature_schema"]["taxa_vocabulary"]
        assert info["feature_schema"]["rank"] == "both"
        deepest = {t.rsplit(";", 1)[-1][:3] for t in vocabulary}
        assert {"g__", "s__"} <= deepest  # genus and species columns side by side

        known = set(httpx.get(f"{polling.url}/v1/model", timeout=5).json()[
            "feature_schema"]["treatments"])
        episodes, _ = patients_from_cohort(workdir / "data/cohort", 40)
        patients = [p for p in episodes if p["treatment"] in known][:3]
        load = Load({"polling": polling, "webhook": hooked}, patients)
        load.start()
        for moved_to in ("2", "1"):
            client.set_registered_model_alias(MODEL, "champion", moved_to)
            for name, server in (("polling", polling), ("webhook", hooked)):
                wait_for(lambda s=server: served(s) == moved_to,  # noqa: B023
                         f"the {name} service to serve version {moved_to}", 60)
            counts = {name: len(answers) for name, answers in load.answers.items()}
            wait_for(lambda c=counts: all(len(load.answers[n]) > c[n] + 4 for n in c),
                     "requests scored after the swap", 30)

        bad = register_tampered_golden(client, "2", workdir)  # digest right, golden wrong
        client.set_registered_model_alias(MODEL, "champion", bad)
        for name, server in (("polling", polling), ("webhook", hooked)):
            wait_for(lambda s=server: (rejection(s) or {}).get("outcome") == "rejected",
                     f"the {name} service to reject version {bad}", 60)
            assert served(server) == "1" and "golden" in rejection(server)["error"]
            ready = httpx.get(f"{server.url}/ready", timeout=5).json()  # public: a code
            assert ready["last_reload_failure"]["error"] == "golden_check_failed"
        load.finish()

        assert not load.errors
        for name, answers in load.answers.items():
            assert answers and all(status == 200 for status, _ in answers), name
            versions = load.versions(name)
            assert "1" in versions and "2" in versions, (name, sorted(set(map(str, versions))))
            assert bad not in versions and versions[-1] == "1"  # the rejected one never served
        follow = httpx.get(f"{hooked.url}/v1/model", timeout=5).json()["follow"]
        assert follow["registry_version"] == bad  # asked the registry: woken by the webhook
        metrics = httpx.get(f"{hooked.url}/metrics", timeout=5).text
        assert 'itp_model_loads_total{outcome="loaded"} 3.0' in metrics
        assert 'itp_model_loads_total{outcome="rejected"} 1.0' in metrics
    finally:
        if load is not None:
            load.finish()
        stop_server(polling)
        if hooked is not None:
            stop_server(hooked)
