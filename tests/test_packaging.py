"""The serving set: what pyproject.toml's base dependencies install, and the Docker image ships.

Serving must import nothing that only training needs, constraints.txt must pin every package
at versions pyproject.toml allows, and the base set alone, installed into a fresh venv the
way the Dockerfile does it, must serve a bundle over HTTP.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import httpx
import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from service.payloads import patient_payloads
from tests.conftest import Trained, start_server, stop_server
from training.cohort import load_cohort

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
CONSTRAINTS = ROOT / "constraints.txt"
SERVE_VENV_LIMIT_MB = 850

# Modules that only training, its plots, cohort files or the MLflow server use (click is not
# one: uvicorn needs it).
TRAINING_ONLY = (
    "training.cli", "training.train", "training.evaluation", "training.plots", "training.card",
    "training.cohort", "training.profiles", "training.simulate", "training.compute",
    "training.registry", "biom", "h5py", "matplotlib", "shap", "numba", "llvmlite", "tqdm",
    "markdown", "tabulate", "mlflow.server", "sqlalchemy", "alembic", "flask",
)
# Distributions only [train] brings: none of them may be in the serving venv.
TRAINING_ONLY_DISTRIBUTIONS = {"mlflow", "shap", "matplotlib", "biom-format", "h5py", "numba",
                               "llvmlite", "markdown", "tabulate", "tqdm", "sqlalchemy",
                               "alembic", "flask", "gunicorn", "pyarrow"}


def pins() -> dict[str, list[tuple[str, str]]]:
    """constraints.txt as name -> [(version, environment marker or "")]."""
    pinned: dict[str, list[tuple[str, str]]] = {}
    for line in CONSTRAINTS.read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9._-]+)==(\S+)(?:\s*;\s*(.+))?$", line)
        if match:
            name, version, marker = match.groups()
            pinned.setdefault(canonicalize_name(name), []).append((version, marker or ""))
    return pinned


def requirements(extra: str | None = None) -> list[Requirement]:
    listed = PROJECT["dependencies"] if extra is None else PROJECT["optional-dependencies"][extra]
    return [Requirement(r) for r in listed]


def sample_patients(trained: Trained, n: int = 3) -> list[dict]:
    cohort = load_cohort(trained.data)
    return patient_payloads(cohort.metadata.iloc[:n], cohort.counts.iloc[:n])


# --- the dependency split and its pins --------------------------------------------------------


def test_training_only_packages_are_not_base_dependencies() -> None:
    base = {canonicalize_name(r.name) for r in requirements()}
    assert not base & TRAINING_ONLY_DISTRIBUTIONS, base & TRAINING_ONLY_DISTRIBUTIONS
    train = {canonicalize_name(r.name) for r in requirements("train")}
    assert {"mlflow", "shap", "matplotlib", "biom-format"} <= train
    assert any(r.name == "itp-response" and {"train"} <= r.extras for r in requirements("dev"))


def test_constraints_pin_every_requirement_within_its_range() -> None:
    """Catches an edit of pyproject.toml's dependencies without `make constraints`."""
    pinned = pins()
    environment = {str(k): str(v) for k, v in default_environment().items()}
    for extra in (None, *PROJECT["optional-dependencies"]):
        for requirement in requirements(extra):
            name = canonicalize_name(requirement.name)
            if name == "itp-response":
                continue
            assert name in pinned, f"{name} ({extra or 'base'}) is not in constraints.txt"
            versions = [v for v, marker in pinned[name]
                        if not marker or Requirement(f"x; {marker}").marker.evaluate(environment)]
            assert versions, name
            for version in versions:
                assert requirement.specifier.contains(version, prereleases=True), (
                    f"constraints.txt pins {name}=={version} outside {requirement}: run "
                    "`make constraints`")


@pytest.mark.e2e
def test_a_training_run_records_every_installed_version(trained: Trained, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(trained.tracking_uri)
    path = client.download_artifacts(trained.result["run_id"], "environment.txt", str(tmp_path))
    recorded = dict(line.split("==") for line in Path(path).read_text().splitlines())
    recorded = {canonicalize_name(name): version for name, version in recorded.items()}
    for name in ("scikit-learn", "xgboost-cpu", "shap", "mlflow", "numpy", "skops"):
        assert recorded[name] == importlib.metadata.version(name), name


# --- the serving path, in this environment ---------------------------------------------------

SERVE_AND_LIST_MODULES = """
import json, sys, time
from fastapi.testclient import TestClient
from service.app import create_app

payload = json.loads(sys.stdin.read())
with TestClient(create_app()) as client:
    deadline = time.monotonic() + 120
    while client.get("/ready").status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.2)
    ready = client.get("/ready").status_code
    predict = client.post("/v1/predict", json=payload)
print(json.dumps({"ready": ready, "predict": predict.status_code,
                  "predictions": len(predict.json().get("predictions", [])),
                  "modules": sorted(sys.modules)}))
"""


@pytest.mark.e2e
def test_serving_a_bundle_imports_no_training_only_module(trained: Trained) -> None:
    """Start the app on a bundle, wait for it to load and pass its checks, score with
    explanations; then nothing training-only may have been imported."""
    env = {**os.environ, "ITP_MODEL_URI": str(trained.bundle)}
    env.pop("MLFLOW_TRACKING_URI", None)
    payload = {"patients": sample_patients(trained), "explain": True, "top_k": 5}
    completed = subprocess.run([sys.executable, "-c", SERVE_AND_LIST_MODULES],
                               input=json.dumps(payload), env=env, cwd=trained.workdir,
                               capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    assert (result["ready"], result["predict"], result["predictions"]) == (200, 200, 3)
    imported = set(result["modules"])
    assert "service.scoring" in imported and "training.bundle" in imported  # it did serve
    leaked = sorted(m for m in imported
                    if any(m == t or m.startswith(t + ".") for t in TRAINING_ONLY))
    assert not leaked, f"the serving path imported training-only modules: {leaked}"


# --- the serving set alone, in a fresh venv, the Dockerfile's way -----------------------------


def tree_megabytes(path: Path) -> float:
    """Allocated size, as `du` counts it."""
    return sum(p.lstat().st_blocks * 512 for p in path.rglob("*")) / 2**20


@pytest.mark.e2e
def test_the_serving_set_alone_serves_a_bundle_from_a_fresh_venv(
    trained: Trained, tmp_path: Path
) -> None:
    """The Dockerfile's install steps, run here (no Docker engine): dependencies from the base
    set with constraints.txt into a venv without pip, then the code; then `itp-serve` from
    that venv alone serves the bundle over HTTP. pip's cache is used."""
    source, venv = tmp_path / "src", tmp_path / "venv"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "constraints.txt"):
        shutil.copy(ROOT / name, source / name)
    for package in ("training", "service"):  # stubs, as the Dockerfile's dependency layer
        (source / package).mkdir()
        (source / package / "__init__.py").touch()
    pip = [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"),
           "--disable-pip-version-check"]

    def run(*command: str) -> None:
        completed = subprocess.run(command, cwd=source, capture_output=True, text=True,
                                   timeout=900)
        assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-3000:]

    started = time.monotonic()
    run(sys.executable, "-m", "venv", "--without-pip", str(venv))
    run(*pip, "install", "--quiet", "-c", "constraints.txt", ".")
    run(*pip, "uninstall", "--yes", "--quiet", "itp-response")
    for package in ("training", "service"):
        shutil.rmtree(source / package)
        shutil.copytree(ROOT / package, source / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    run(*pip, "install", "--quiet", "--no-deps", ".")
    install_seconds = time.monotonic() - started

    listing = subprocess.run(
        [str(venv / "bin" / "python"), "-c",
         "import importlib.metadata as m, json; print(json.dumps("
         "{d.metadata['Name']: d.version for d in m.distributions()}))"],
        capture_output=True, text=True, check=True)
    installed = {canonicalize_name(k): v for k, v in json.loads(listing.stdout).items()}
    assert not installed.keys() & TRAINING_ONLY_DISTRIBUTIONS
    assert not {"pip", "setuptools"} & installed.keys()
    pinned = pins()
    unpinned = sorted(set(installed) - set(pinned) - {"itp-response"})
    assert not unpinned, f"installed but not in constraints.txt: {unpinned}"
    for name, version in installed.items():
        if name in pinned:
            assert version in [v for v, _ in pinned[name]], (name, version, pinned[name])
    size = tree_megabytes(venv)
    assert size <= SERVE_VENV_LIMIT_MB, f"serving venv {size:.0f} MB"

    home = tmp_path / "home"  # the image's HOME is /tmp: nothing may need a real home
    home.mkdir()
    env = {key: value for key, value in os.environ.items()
           if key not in {"VIRTUAL_ENV", "PYTHONPATH", "MLFLOW_TRACKING_URI", "PYTHONHOME"}}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", HOME=str(home),
               XDG_CACHE_HOME=str(tmp_path / "cache"), MLFLOW_DISABLE_TELEMETRY="true",
               PYTHONDONTWRITEBYTECODE="1", ITP_MODEL_URI=str(trained.bundle))
    server = start_server([str(venv / "bin" / "itp-serve")], env, cwd=tmp_path,
                          log=tmp_path / "serve.log", timeout=120)
    try:
        payload = {"patients": sample_patients(trained), "explain": True, "top_k": 3}
        response = httpx.post(f"{server.url}/v1/predict", json=payload, timeout=60)
        assert response.status_code == 200, response.text
        predictions = response.json()["predictions"]
        assert len(predictions) == 3
        assert all(0 < p["probability"] < 1 and p["explanation"]["contributions"]
                   for p in predictions)
        assert httpx.get(f"{server.url}/metrics", timeout=10).status_code == 200
    finally:
        stop_server(server)
    assert "Traceback" not in server.output(), server.output()[-3000:]
    print(f"serving venv: {size:.0f} MB, installed in {install_seconds:.0f} s")
