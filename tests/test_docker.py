"""No Docker engine runs here, so the Dockerfile is linted and its promises read."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def test_hadolint_finds_nothing() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or "hadolint"
    completed = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True,
                               text=True)
    assert completed.returncode == 0, completed.stdout + completed.stderr


def test_slim_base_non_root_user_and_healthcheck_on_ready_at_itp_port() -> None:
    assert re.search(r"^FROM python:3\.\d+-slim", DOCKERFILE, re.MULTILINE)
    users = re.findall(r"^USER\s+(\S+)", DOCKERFILE, re.MULTILINE)
    assert users and users[-1] not in {"root", "0"}
    check = re.search(r"^HEALTHCHECK .*\n?.*", DOCKERFILE, re.MULTILINE)
    assert check and "/ready" in check.group(0) and "ITP_PORT" in check.group(0)
    assert 'CMD ["itp-serve"]' in DOCKERFILE


def test_dependencies_are_installed_before_the_code_is_copied() -> None:
    """A code edit must not invalidate the dependency layer; runtime writes only to /tmp."""
    dependencies = DOCKERFILE.index("install --no-cache-dir -c constraints.txt .")
    assert dependencies < DOCKERFILE.index("COPY training") < DOCKERFILE.index("--no-deps")
    assert len(re.findall(r"^FROM ", DOCKERFILE, re.MULTILINE)) == 2  # build and runtime
    assert "MLFLOW_DISABLE_TELEMETRY=true" in DOCKERFILE
    assert "HOME=/tmp" in DOCKERFILE and "XDG_CACHE_HOME=/tmp/" in DOCKERFILE


def test_only_the_serving_set_is_installed_at_the_pinned_versions() -> None:
    """The base dependencies (no [train] extra: no full MLflow, shap, matplotlib, BIOM), with
    constraints.txt copied in the dependency layer, before the code."""
    copied = re.search(r"^COPY (.+) \./$", DOCKERFILE, re.MULTILINE)
    assert copied and "constraints.txt" in copied.group(1).split()
    assert copied.start() < DOCKERFILE.index("COPY training")
    installs = re.findall(r"\binstall [^\n]*", DOCKERFILE)  # not un-/reinstall
    assert installs and all("[" not in line for line in installs)  # no extras
    assert all("-c constraints.txt" in line for line in installs if "--no-deps" not in line)
    # the venv has no pip or setuptools of its own: the base image's pip installs into it
    assert "venv --without-pip /opt/venv" in DOCKERFILE


def test_image_serves_a_mounted_bundle_by_default_and_copies_no_data() -> None:
    assert "ITP_MODEL_URI=/models/itp-response" in DOCKERFILE
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {"data", "models", "mlflow.db", ".venv"} <= set(ignored)
