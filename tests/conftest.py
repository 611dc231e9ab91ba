"""Shared end-to-end fixtures: the user's path, run once per session with the real parts.

simulate (CLI) -> train + register + export (CLI, SQLite MLflow store) -> uvicorn subprocess.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

# MLflow's telemetry thread sets and unsets an environment variable while others read the
# environment (httpx's proxy lookup raised KeyError mid-iteration); the CLIs turn it off too,
# and so do the tests, in-process clients and the `mlflow server`s they start included.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

BIN = Path(sys.executable).parent
MODEL = "itp-response"
E2E_PATIENTS = 400
E2E_SEED = 7


@dataclass(frozen=True)
class Trained:
    workdir: Path
    data: Path
    tracking_uri: str
    bundle: Path
    result: dict
    truth: dict

    def env(self, **extra: str) -> dict[str, str]:
        return {**os.environ, "MLFLOW_TRACKING_URI": self.tracking_uri, **extra}


def run_cli(*args: str, cwd: Path, env: dict[str, str] | None = None,
            check: bool = True) -> subprocess.CompletedProcess[str]:
    completed = subprocess.run(
        [str(BIN / "itp-train"), *args], cwd=cwd, env=env or dict(os.environ),
        capture_output=True, text=True, timeout=600,
    )
    if check and completed.returncode != 0:
        raise AssertionError(f"itp-train {' '.join(args)} failed:\n{completed.stderr[-3000:]}")
    return completed


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    """A demo-sized cohort trained the way README.md says (`make train`: preset fast, two
    jobs), with fewer bootstrap resamples and label permutations (the permutation control's
    own tests are in test_nested, test_train and test_real_data)."""
    workdir = tmp_path_factory.mktemp("e2e")
    tracking_uri = f"sqlite:///{workdir / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}
    run_cli("simulate", "--n-patients", str(E2E_PATIENTS), "--seed", str(E2E_SEED),
            "--out", "data/demo", cwd=workdir, env=env)
    completed = run_cli(
        "train", "--data", "data/demo", "--experiment", MODEL, "--register", MODEL,
        "--alias", "champion", "--bootstrap", "300", "--permutations", "2", "--jobs", "2",
        "--export", f"models/{MODEL}", cwd=workdir, env=env,
    )
    return Trained(
        workdir=workdir,
        data=workdir / "data/demo",
        tracking_uri=tracking_uri,
        bundle=workdir / "models" / MODEL,
        result=json.loads(completed.stdout),
        truth=json.loads((workdir / "data/demo/truth.json").read_text()),
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    process: subprocess.Popen[str]
    log: Path

    def output(self) -> str:
        return self.log.read_text()


def start_server(command: list[str], env: dict[str, str], cwd: Path, log: Path,
                 expect_ready: bool = True, timeout: float = 90) -> Server:
    port = free_port()
    env = {**env, "ITP_PORT": str(port), "ITP_HOST": "127.0.0.1"}
    command = [part.replace("{port}", str(port)) for part in command]
    handle = log.open("w")
    process = subprocess.Popen(command, env=env, cwd=cwd, stdout=handle,
                               stderr=subprocess.STDOUT, text=True)
    server = Server(f"http://127.0.0.1:{port}", process, log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"server exited early:\n{server.output()}")
        try:
            status = httpx.get(f"{server.url}/ready", timeout=2).status_code
        except httpx.TransportError:
            time.sleep(0.3)
            continue
        if status == 200 or not expect_ready:
            return server
        time.sleep(0.3)
    stop_server(server)
    raise AssertionError(f"server not ready within {timeout}s:\n{server.output()}")


def stop_server(server: Server) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        server.process.kill()


@pytest.fixture(scope="session")
def registry_server(trained: Trained) -> Iterator[Server]:
    """`uvicorn service.app:app`, serving models:/itp-response@champion from the store."""
    server = start_server(
        [str(BIN / "python"), "-m", "uvicorn", "service.app:app", "--port", "{port}"],
        trained.env(ITP_MODEL_URI=f"models:/{MODEL}@champion"),
        cwd=trained.workdir, log=trained.workdir / "registry-server.log",
    )
    yield server
    stop_server(server)


@pytest.fixture(scope="session")
def bundle_server(trained: Trained) -> Iterator[Server]:
    """`itp-serve` on the exported bundle: no tracking server involved."""
    env = trained.env(ITP_MODEL_URI=str(trained.bundle), ITP_ADMIN_TOKEN="test-token")
    env.pop("MLFLOW_TRACKING_URI")
    server = start_server([str(BIN / "itp-serve")], env, cwd=trained.workdir,
                          log=trained.workdir / "bundle-server.log")
    yield server
    stop_server(server)
