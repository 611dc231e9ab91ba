"""deploy/ and docs/deploy.md, checked without Docker or a cluster.

Everything the files promise that can be read is checked against the code it configures:
environment variables are real `Settings` fields, probes and scrapes hit routes the app
really has, ports agree with ITP_PORT, the proxy and Prometheus see both replicas, and the
doc's table of environment variables is the `Settings` class, default for default.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import AliasChoices

from service.app import create_app
from service.cli import THREAD_VARIABLES
from service.settings import MIN_WEBHOOK_SECRET, Settings

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
DOC = ROOT / "docs" / "deploy.md"
COMPOSE_FILE = DEPLOY / "compose.yaml"
COMPOSE: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]
NGINX = (DEPLOY / "nginx" / "itp.conf").read_text()
PROMETHEUS: dict[str, Any] = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|_KEYS?$|_KEY_ID$")
INTERPOLATION = re.compile(r"\$\{(?P<name>[A-Z0-9_]+)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


# --- what the service accepts and answers -----------------------------------------------------

def env_names() -> dict[str, str]:
    """Every environment variable Settings reads -> its field."""
    names = {}
    for field, info in Settings.model_fields.items():
        alias = info.validation_alias
        if isinstance(alias, AliasChoices):
            names.update({str(choice): field for choice in alias.choices})
        else:
            names[f"ITP_{field.upper()}"] = field
    return names


def primary_name(field: str) -> str:
    alias = Settings.model_fields[field].validation_alias
    return str(alias.choices[0]) if isinstance(alias, AliasChoices) else f"ITP_{field.upper()}"


def routes(**settings: Any) -> dict[str, set[str]]:
    """Path -> methods of the app as built from these settings (no model is loaded)."""
    app = create_app(Settings(model_uri="models:/itp-response@champion", tracking_uri=None,
                              **settings))
    return {route.path: set(route.methods) for route in app.routes if hasattr(route, "methods")}


def settings_from(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Settings as the service would build them from this environment (and only it)."""
    for name in list(os.environ):
        if name.startswith(("ITP_", "MLFLOW_")):
            monkeypatch.delenv(name)
    for name, value in env.items():
        # a secret as deploy/.env holds one: 48 characters (the webhook's needs 32 or more)
        monkeypatch.setenv(name, INTERPOLATION.sub("p" * 48, value))
    return Settings()


def itp_services() -> dict[str, dict[str, Any]]:
    return {name: service for name, service in SERVICES.items()
            if "ITP_MODEL_URI" in service.get("environment", {})}


def image_default(image: str) -> str:
    """`${VAR:-default}` -> default; anything else as is."""
    match = INTERPOLATION.fullmatch(image)
    return match["arg"] if match and match["op"] == ":-" else image


def seconds(duration: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m)", duration)
    assert match, duration
    return float(match[1]) * {"ms": 0.001, "s": 1, "m": 60}[match[2]]


def has_healthcheck(service: dict[str, Any]) -> bool:
    if "healthcheck" in service:
        return not service["healthcheck"].get("disable", False)
    build = service.get("build")
    if build:  # a HEALTHCHECK in the Dockerfile it builds
        dockerfile = DEPLOY / build["context"] / build.get("dockerfile", "Dockerfile")
        return "HEALTHCHECK" in dockerfile.read_text()
    return False


# --- compose ----------------------------------------------------------------------------------

def test_compose_has_the_stack() -> None:
    assert {"postgres", "minio", "minio-init", "mlflow", "itp-1", "itp-2", "proxy",
            "prometheus", "grafana"} <= set(SERVICES)


def test_two_identical_replicas_of_the_service_built_from_the_repo_dockerfile() -> None:
    replicas = itp_services()
    count = sum(service.get("deploy", {}).get("replicas", 1) for service in replicas.values())
    assert count == 2, replicas.keys()
    first, *others = replicas.values()
    assert all(other == first for other in others)  # same image, settings and limits
    build = first["build"]
    assert (DEPLOY / build["context"]).resolve() == ROOT
    assert (ROOT / build["dockerfile"]).is_file()
    assert first["environment"]["ITP_MODEL_URI"] == "models:/itp-response@champion"
    assert first["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"


def test_build_contexts_images_and_mounted_files_exist() -> None:
    for name, service in SERVICES.items():
        if "build" in service:
            context = DEPLOY / service["build"]["context"]
            assert (context / service["build"].get("dockerfile", "Dockerfile")).is_file(), name
        else:
            image = image_default(service["image"])
            assert re.fullmatch(r"[\w./-]+:[\w.-]+", image), (name, image)
            assert not image.endswith(":latest"), name
        for volume in service.get("volumes", []):
            source = volume.split(":")[0] if isinstance(volume, str) else volume.get("source")
            if source and source.startswith("."):
                assert (DEPLOY / source).exists(), (name, source)
    named = {volume.split(":")[0] for service in SERVICES.values()
             for volume in service.get("volumes", []) if isinstance(volume, str)
             and not volume.startswith((".", "/"))}
    assert named <= set(COMPOSE.get("volumes", {}))


def test_service_environment_is_real_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every variable given to the service is one it reads, with a value it accepts."""
    known = set(env_names())
    for name, service in itp_services().items():
        env = service["environment"]
        unknown = {key for key in env if key not in known and not key.startswith("MLFLOW_")
                   and key not in THREAD_VARIABLES}
        assert not unknown, (name, unknown)
        settings = settings_from(env, monkeypatch)
        assert settings.port == int(env["ITP_PORT"])
        assert settings.webhook_secret is not None and settings.api_keys  # secured
        assert settings.admin_token is not None


def test_secrets_come_from_the_environment_never_from_the_repo() -> None:
    required = set()
    for name, service in SERVICES.items():
        for key, value in service.get("environment", {}).items():
            required |= {m["name"] for m in INTERPOLATION.finditer(str(value)) if m["op"] == ":?"}
            if SECRET_NAME.search(key):
                match = INTERPOLATION.fullmatch(str(value))
                assert match and match["op"] == ":?", (name, key)  # compose refuses it unset
    example = (DEPLOY / ".env.example").read_text()
    given = dict(re.findall(r"^([A-Z0-9_]+)=(.*)$", example, re.MULTILINE))
    assert required <= set(given), required - set(given)
    assert not any(given.values()), "no value in .env.example: every secret is filled locally"
    assert ".env" in (DEPLOY / ".gitignore").read_text().split()
    tracked = subprocess.run(["git", "ls-files", "deploy/.env"], cwd=ROOT, capture_output=True,
                             text=True).stdout
    assert not tracked.strip()


def test_start_order_waits_on_health_where_it_means_something() -> None:
    for name, service in SERVICES.items():
        for target, dependency in (service.get("depends_on") or {}).items():
            if dependency["condition"] == "service_healthy":
                assert has_healthcheck(SERVICES[target]), (name, target)
    for service in itp_services().values():
        assert service["depends_on"]["mlflow"]["condition"] == "service_healthy"
    mlflow = SERVICES["mlflow"]["depends_on"]
    assert mlflow["postgres"]["condition"] == "service_healthy"
    assert mlflow["minio-init"]["condition"] == "service_completed_successfully"
    assert SERVICES["minio-init"]["depends_on"]["minio"]["condition"] == "service_healthy"
    assert SERVICES["minio-init"]["restart"] == "no"
    # the proxy must start before any model exists: it only needs the replicas started
    assert {dep["condition"] for dep in SERVICES["proxy"]["depends_on"].values()} == {
        "service_started"}


def test_replica_health_is_readiness_and_shutdown_fits_in_the_stop_grace() -> None:
    paths = routes()
    for name, service in itp_services().items():
        env = service["environment"]
        check = " ".join(service["healthcheck"]["test"])
        path = re.search(rf"127\.0\.0\.1:{env['ITP_PORT']}(/\w+)", check)
        assert path and path[1] == "/ready" and "/ready" in paths, (name, check)
        grace = float(env.get("ITP_SHUTDOWN_GRACE_SECONDS",
                              Settings.model_fields["shutdown_grace_seconds"].default))
        assert seconds(service["stop_grace_period"]) > grace, name


def test_replicas_are_locked_down_and_only_localhost_is_published() -> None:
    for name, service in itp_services().items():
        assert service["read_only"] is True
        assert any(v.get("type") == "tmpfs" and v["target"] == "/tmp"
                   for v in service["volumes"] if isinstance(v, dict)), name
        assert service["cap_drop"] == ["ALL"]
        assert "ports" not in service, f"{name}: reached through the proxy only"
        limits = service["deploy"]["resources"]["limits"]
        assert float(limits["cpus"]) >= 1 and limits["memory"] == "1g"
        assert int(service["environment"]["OMP_NUM_THREADS"]) == int(float(limits["cpus"]))
    for name, service in SERVICES.items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), (name, port)
    assert COMPOSE["networks"]["store"]["internal"] is True
    for name in ("postgres", "minio", "minio-init"):
        assert SERVICES[name]["networks"] == ["store"], name


def nginx_size(value: str) -> int:
    number, unit = re.fullmatch(r"(\d+)([kKmMgG]?)", value).groups()  # type: ignore[union-attr]
    return int(number) * {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[unit.lower()]


def test_proxy_balances_both_replicas_and_hides_internal_routes() -> None:
    upstream = re.search(r"upstream\s+(\w+)\s*\{(.*?)\}", NGINX, re.DOTALL)
    assert upstream
    servers = set(re.findall(r"^\s*server\s+([\w.-]+:\d+)", upstream[2], re.MULTILINE))
    expected = {f"{name}:{service['environment']['ITP_PORT']}"
                for name, service in itp_services().items()}
    assert servers == expected
    assert f"proxy_pass http://{upstream[1]};" in NGINX
    body = re.search(r"client_max_body_size\s+(\w+);", NGINX)
    assert body and nginx_size(body[1]) > Settings.model_fields["max_body_bytes"].default
    hidden = re.findall(r"location\s+(?:=|\^~)\s+(\S+)\s*\{\s*return 404;", NGINX)
    paths = routes(admin_token="admin", webhook_secret="w" * MIN_WEBHOOK_SECRET)
    for prefix in ("/metrics", "/v1/model/reload", "/v1/webhooks/"):
        assert prefix in hidden
        assert any(path.startswith(prefix) for path in paths), prefix  # a real route
    assert "/v1/predict" not in hidden and "/v1/model" not in hidden
    healthcheck = " ".join(SERVICES["proxy"]["healthcheck"]["test"])
    assert re.search(r"location\s+=\s+(\S+)", NGINX)[1] in healthcheck  # type: ignore[index]
    mount = next(v for v in SERVICES["proxy"]["volumes"] if "itp.conf" in v)
    assert mount.split(":")[1] == "/etc/nginx/conf.d/default.conf"


def test_prometheus_scrapes_each_replica_not_the_proxy() -> None:
    job = next(j for j in PROMETHEUS["scrape_configs"] if j["job_name"] == "itp-response")
    assert job.get("metrics_path", "/metrics") == "/metrics" and "/metrics" in routes()
    targets = {t for group in job["static_configs"] for t in group["targets"]}
    expected = {f"{name}:{service['environment']['ITP_PORT']}"
                for name, service in itp_services().items()}
    assert targets == expected
    assert not any(target.startswith("proxy") for target in targets)
    mount = next(v for v in SERVICES["prometheus"]["volumes"] if "prometheus.yml" in v)
    assert mount.split(":")[1] in " ".join(SERVICES["prometheus"]["command"])


def test_tracking_server_uses_postgres_minio_and_lets_the_replicas_in() -> None:
    mlflow = SERVICES["mlflow"]
    command = mlflow["command"]
    env = mlflow["environment"]
    assert env["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql+psycopg2://")
    assert "@postgres:5432/" in env["MLFLOW_BACKEND_STORE_URI"]
    assert "--serve-artifacts" in command
    assert any(arg.startswith("--artifacts-destination=s3://") for arg in command)
    assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert INTERPOLATION.fullmatch(env["MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY"])
    # MLflow refuses requests whose Host it does not know: the replicas' must be allowed
    allowed = next(arg.split("=", 1)[1] for arg in command if arg.startswith("--allowed-hosts"))
    for service in itp_services().values():
        host = service["environment"]["MLFLOW_TRACKING_URI"].split("//")[1]
        assert host in allowed.split(","), host
    assert env["MLFLOW_WEBHOOK_ALLOWED_SCHEMES"] == "http,https"


def test_tracking_server_image_matches_the_clients_mlflow() -> None:
    dockerfile = (DEPLOY / "mlflow" / "Dockerfile").read_text()
    version = re.search(r"^ARG MLFLOW_VERSION=(\S+)$", dockerfile, re.MULTILINE)
    constraints = ROOT / "constraints.txt"
    pinned = (re.search(r"^mlflow(?:-skinny)?==(\S+)$", constraints.read_text(), re.MULTILINE)
              if constraints.is_file() else None)
    expected = pinned[1] if pinned else importlib.metadata.version("mlflow-skinny")
    assert version and version[1] == expected
    assert INTERPOLATION.fullmatch(SERVICES["mlflow"]["build"]["args"]["MLFLOW_VERSION"])["arg"] \
        == expected  # type: ignore[index]
    assert "psycopg2" in dockerfile and "boto3" in dockerfile


def test_tracking_server_dockerfile_lints_clean() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or "hadolint"
    completed = subprocess.run([hadolint, str(DEPLOY / "mlflow" / "Dockerfile")],
                               capture_output=True, text=True)
    assert completed.returncode == 0, completed.stdout + completed.stderr


def test_compose_validates_with_docker_compose(tmp_path: Path) -> None:
    """The real parser, where it is installed (`docker compose` v2 or `docker-compose` v2)."""
    for command in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(command[0]) and subprocess.run(
                [*command, "version"], capture_output=True, text=True).stdout.find("v2") >= 0:
            break
    else:
        pytest.skip("no docker compose v2 here")
    example = (DEPLOY / ".env.example").read_text()
    env = tmp_path / "test.env"
    env.write_text(re.sub(r"^([A-Z0-9_]+)=$", r"\1=0123456789abcdef", example, flags=re.MULTILINE))
    completed = subprocess.run([*command, "-f", str(COMPOSE_FILE), "--env-file", str(env),
                                "config", "--quiet"], capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr


# --- Kubernetes -------------------------------------------------------------------------------

KINDS = {"deployment.yaml": ("apps/v1", "Deployment"), "service.yaml": ("v1", "Service"),
         "hpa.yaml": ("autoscaling/v2", "HorizontalPodAutoscaler"),
         "pdb.yaml": ("policy/v1", "PodDisruptionBudget")}


def manifest(name: str) -> dict[str, Any]:
    (document,) = [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]
    return document


DEPLOYMENT = manifest("deployment.yaml")
POD = DEPLOYMENT["spec"]["template"]["spec"]
(CONTAINER,) = POD["containers"]
K8S_ENV = {item["name"]: item for item in CONTAINER["env"]}


def test_manifests_have_the_right_api_versions_and_are_all_applied() -> None:
    for name, (api_version, kind) in KINDS.items():
        document = manifest(name)
        assert (document["apiVersion"], document["kind"]) == (api_version, kind), name
        assert document["metadata"]["name"] == "itp-response"
    kustomization = manifest("kustomization.yaml")
    assert set(kustomization["resources"]) == {p.name for p in K8S.glob("*.yaml")} - {
        "kustomization.yaml"}
    assert {image["name"] for image in kustomization["images"]} == {CONTAINER["image"]}


def test_probes_hit_routes_the_service_answers() -> None:
    paths = routes()
    assert CONTAINER["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert CONTAINER["livenessProbe"]["httpGet"]["path"] == "/health"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = CONTAINER[probe]["httpGet"]
        assert "GET" in paths[get["path"]], probe
        assert get["port"] in {p["name"] for p in CONTAINER["ports"]}, probe
    # liveness must not depend on the model or the registry: /health, never /ready
    assert CONTAINER["livenessProbe"]["httpGet"]["path"] != "/ready"


def test_container_port_is_itp_port(monkeypatch: pytest.MonkeyPatch) -> None:
    literal = {name: item["value"] for name, item in K8S_ENV.items() if "value" in item}
    settings = settings_from(literal, monkeypatch)
    (port,) = CONTAINER["ports"]
    assert port["containerPort"] == settings.port
    assert settings.host == "0.0.0.0"
    annotations = DEPLOYMENT["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == settings.port
    assert annotations["prometheus.io/path"] in routes()


def test_deployment_environment_is_real_settings_and_secrets_come_from_a_secret() -> None:
    known = set(env_names())
    for name, item in K8S_ENV.items():
        assert name in known or name.startswith("MLFLOW_") or name in THREAD_VARIABLES, name
        if SECRET_NAME.search(name):
            assert "secretKeyRef" in item.get("valueFrom", {}), name
    assert {"ITP_API_KEYS", "ITP_ADMIN_KEY", "ITP_WEBHOOK_SECRET"} <= {
        name for name, item in K8S_ENV.items() if "secretKeyRef" in item.get("valueFrom", {})}


def test_non_root_read_only_with_a_writable_tmp() -> None:
    pod, container = POD["securityContext"], CONTAINER["securityContext"]
    assert pod["runAsNonRoot"] is True and pod["runAsUser"] == 10001
    assert container["readOnlyRootFilesystem"] is True
    assert container["allowPrivilegeEscalation"] is False
    assert container["capabilities"]["drop"] == ["ALL"]
    users = re.findall(r"^USER\s+(\S+)", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    assert users[-1] == str(pod["runAsUser"])  # the image's own user
    (mount,) = [m for m in CONTAINER["volumeMounts"] if m["mountPath"] == "/tmp"]
    (volume,) = [v for v in POD["volumes"] if v["name"] == mount["name"]]
    assert "emptyDir" in volume


def test_termination_grace_outlasts_the_drain() -> None:
    grace = float(K8S_ENV["ITP_SHUTDOWN_GRACE_SECONDS"]["value"])
    command = CONTAINER["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    assert POD["terminationGracePeriodSeconds"] > float(command[1]) + grace


def quantity(value: str) -> float:
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "": 1}
    number, unit = re.fullmatch(r"([\d.]+)(m|Ki|Mi|Gi|)", str(value)).groups()  # type: ignore[union-attr]
    return float(number) * units[unit]


def test_resources_fit_a_two_core_one_gigabyte_budget() -> None:
    requests, limits = CONTAINER["resources"]["requests"], CONTAINER["resources"]["limits"]
    assert quantity(requests["cpu"]) <= quantity(limits["cpu"]) <= 2
    assert quantity(requests["memory"]) <= quantity(limits["memory"]) <= 2**30
    assert quantity(requests["memory"]) >= 512 * 2**20  # a loaded model scoring a batch
    assert float(K8S_ENV["OMP_NUM_THREADS"]["value"]) == quantity(limits["cpu"])
    assert K8S_ENV["ITP_WORKERS"]["value"] == "1"


def test_replicas_autoscaling_disruption_budget_and_service_select_the_pods() -> None:
    labels = DEPLOYMENT["spec"]["template"]["metadata"]["labels"]
    selects = DEPLOYMENT["spec"]["selector"]["matchLabels"]
    assert selects.items() <= labels.items()
    assert DEPLOYMENT["spec"]["replicas"] == 2
    hpa = manifest("hpa.yaml")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                     "name": DEPLOYMENT["metadata"]["name"]}
    assert hpa["minReplicas"] == DEPLOYMENT["spec"]["replicas"] <= hpa["maxReplicas"]
    (metric,) = hpa["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"]["type"] == "Utilization"
    assert "cpu" in CONTAINER["resources"]["requests"]  # utilization is relative to it
    pdb = manifest("pdb.yaml")["spec"]
    assert pdb["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["minAvailable"] < DEPLOYMENT["spec"]["replicas"]
    service = manifest("service.yaml")["spec"]
    assert service["selector"].items() <= labels.items()
    (port,) = service["ports"]
    assert port["targetPort"] in {p["name"] for p in CONTAINER["ports"]}


def test_manifests_validate_against_the_kubernetes_schemas() -> None:
    validate = pytest.importorskip("kubernetes_validate")
    for name in KINDS:
        validate.validate(manifest(name), "1.32.0", strict=True)


def test_kustomize_renders_the_manifests() -> None:
    kubectl = shutil.which("kubectl")
    if not kubectl:
        pytest.skip("no kubectl here")
    completed = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr
    kinds = {d["kind"] for d in yaml.safe_load_all(completed.stdout) if d}
    assert kinds == {kind for _, kind in KINDS.values()}
    assert "registry.example.com/itp-response:0.1.0" in completed.stdout


# --- the webhook registration script ------------------------------------------------------------

def test_register_webhooks_creates_one_per_replica_and_updates_in_place(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Against MLflow's own store, with the event name and arguments MLflow 3 checks."""
    pytest.importorskip("mlflow.store.model_registry.sqlalchemy_store")
    from cryptography.fernet import Fernet
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_WEBHOOK_ALLOWED_SCHEMES", "http,https")
    monkeypatch.setenv("MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS", "true")
    monkeypatch.setenv("MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY", Fernet.generate_key().decode())
    sys.path.insert(0, str(DEPLOY))
    try:
        import register_webhooks
    finally:
        sys.path.remove(str(DEPLOY))
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    first = register_webhooks.register(client, ["http://itp-1:8000", "http://itp-2:8000/"],
                                       "one")
    again = register_webhooks.register(client, ["http://itp-1:8000"], "two")
    hooks = {hook.name: hook for hook in client.list_webhooks()}
    assert set(hooks) == set(first) == {"itp-serve-itp-1-8000", "itp-serve-itp-2-8000"}
    assert again["itp-serve-itp-1-8000"] == first["itp-serve-itp-1-8000"]  # updated in place
    one, two = hooks["itp-serve-itp-1-8000"], hooks["itp-serve-itp-2-8000"]
    assert one.url == "http://itp-1:8000/v1/webhooks/mlflow" and one.secret == "two"
    assert two.url == "http://itp-2:8000/v1/webhooks/mlflow" and two.secret == "one"
    assert [str(event) for event in one.events] == ["model_version_alias.created"]


# --- docs/deploy.md ---------------------------------------------------------------------------

def doc_env_table() -> list[list[str]]:
    """Rows of the table whose header is `| variable | default | meaning |`."""
    lines = DOC.read_text().splitlines()
    start = lines.index("| variable | default | meaning |")
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def rendered_default(field: str) -> str:
    info = Settings.model_fields[field]
    value = info.get_default(call_default_factory=True)
    if value in (None, []):
        return "unset"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def test_doc_lists_every_setting_with_its_default() -> None:
    rows = doc_env_table()
    names = env_names()
    listed: dict[str, list[str]] = {}
    for row in rows:
        variables = re.findall(r"`([A-Z][A-Z0-9_]+)`", row[0])
        assert variables, row
        for variable in variables:
            assert variable in names, f"{variable} in docs/deploy.md is not a setting"
            listed[names[variable]] = row
    missing = {primary_name(field) for field in Settings.model_fields} - {
        primary_name(field) for field in listed}
    assert not missing, f"docs/deploy.md does not list {sorted(missing)}"
    for field, row in listed.items():
        default = row[1].replace("`", "").split(" (")[0].strip()
        assert default == rendered_default(field), (primary_name(field), row[1])
        assert row[2], primary_name(field)


def test_doc_points_at_files_that_exist_and_the_real_commands() -> None:
    text = DOC.read_text()
    for path in set(re.findall(r"\bdeploy/[\w./-]*\w", text)) - {"deploy/.env"}:
        assert (ROOT / path).exists(), path  # deploy/.env is made from .env.example
    assert "--register itp-response --alias champion" in text
    assert "model_version_alias.created" in text and "register_webhooks.py" in text
    assert "docs/benchmarks.md" in text and "Serving image size" in text
    for route in ("/ready", "/health", "/v1/model", "/metrics"):
        assert f"`{route}`" in text or f"`GET {route}`" in text, route


def section(title: str) -> str:
    """The text of docs/deploy.md's `## title` section."""
    text = DOC.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def test_doc_kubernetes_webhook_names_what_mlflow_needs_for_a_cluster_url() -> None:
    """The Service URL is plain HTTP on a private ClusterIP: MLflow refuses it unless told."""
    kubernetes = section("Kubernetes")
    assert "Service URL" in kubernetes
    assert "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS=true" in kubernetes
    assert "MLFLOW_WEBHOOK_ALLOWED_SCHEMES=http,https" in kubernetes


def test_doc_generates_webhook_secrets_long_enough() -> None:
    """Every secret the doc generates is one the service accepts as ITP_WEBHOOK_SECRET."""
    text = DOC.read_text()
    sizes = [int(n) for n in re.findall(r"token_hex\((\d+)\)", text)]
    sizes += [int(n) for n in re.findall(r"openssl rand -hex (\d+)", text)]
    assert sizes and all(2 * n >= MIN_WEBHOOK_SECRET for n in sizes), sizes
    assert f"at least {MIN_WEBHOOK_SECRET} characters" in text
    script = (DEPLOY / "register_webhooks.py").read_text()
    assert f"MIN_SECRET = {MIN_WEBHOOK_SECRET}" in script
