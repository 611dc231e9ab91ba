"""Model storage: MLflow model format, registry versions and aliases, local bundles.

A model is an MLflow sklearn-flavour directory serialised with skops, never pickle: skops
rebuilds only types on an allow-list, and that allow-list is `TRUSTED_TYPES` below, in our
code, not the one a model directory declares about itself (which is what
`mlflow.sklearn.load_model` would trust). A SHA-256 digest of the model files is stored as a
tag on the registry version and in a bundle's `bundle.json`, and checked before loading.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import skops.io
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.models import Model
from mlflow.models.signature import infer_signature
from mlflow.types.schema import ColSpec, Schema

from training import schema
from training.tuning import ResponseModel

MODEL_NAME = "model"  # name of the logged model within a run
MODEL_FILE = "model.skops"
DIGESTED_FILES = ("MLmodel", MODEL_FILE)
DIGEST_TAG = "sha256"
BUNDLE_FILE = "bundle.json"
SIGNATURE_FILE = "bundle.sig"
METADATA_KEY = "itp_response"

TRUSTED_TYPES: list[str] = [
    "training.features.TaxonomyAligner",
    "training.features.Closure",
    "training.features.PrevalenceFilter",
    "training.features.CLR",
    "training.features.AlphaDiversity",
    "training.features.ClinicalEncoder",
    "training.model.FeatureBlocks",
    "training.model._ToArray",
    "training.structure.LinearDesign",
    "training.structure.PenalisedLogistic",
    "training.tuning.ResponseModel",
    "sklearn.compose._column_transformer.make_column_selector",
    "xgboost.core.Booster",
    "xgboost.sklearn.XGBClassifier",
    "xgboost.sklearn.XGBRFClassifier",
    "numpy.dtype",
]


_BOOLEANS = {f.name for f in schema.CLINICAL_FIELDS if f.kind == schema.Kind.BOOLEAN}


class ModelIntegrityError(RuntimeError):
    """The model files are not the ones that were registered or exported."""


@dataclass(frozen=True)
class StoredModel:
    """A model read back from the registry or a bundle, with what is known about it."""

    model: ResponseModel
    name: str
    version: str | None
    run_id: str | None
    source: str
    digest: str
    metadata: dict[str, Any]
    integrity: str = "registry"  # what the digest was checked against (registry.load)


def digest(directory: Path) -> str:
    """SHA-256 over the files that define the model (MLflow adds others when downloading)."""
    outer = hashlib.sha256()
    for name in DIGESTED_FILES:
        outer.update(name.encode())
        outer.update(hashlib.sha256((directory / name).read_bytes()).digest())
    return outer.hexdigest()


def example_input(X: pd.DataFrame) -> pd.DataFrame:
    """A typical, synthetic episode for the model's signature and input example.

    MLflow ships the input example with the model, so it must not be a real patient's row:
    medians for numbers, the most frequent value otherwise, median reads per taxon.
    """
    row: dict[str, Any] = {}
    for column in X.columns:
        values = X[column].dropna()
        if values.empty:
            row[column] = np.nan if X[column].dtype.kind == "f" else None
        elif schema.is_taxon(column):
            median = float(values.median())  # counts stay whole; relative abundances do not
            row[column] = round(median) if (values % 1 == 0).all() else median
        elif X[column].dtype.kind == "f" and column not in _BOOLEANS:
            row[column] = float(values.median())
        else:
            row[column] = values.mode().iloc[0]
    frame = pd.DataFrame([row], index=["example"], columns=X.columns)
    return frame.astype({c: float for c in X.columns if X[c].dtype.kind == "f"})


def _signature(pipeline: ResponseModel, example: pd.DataFrame) -> Any:
    """Taxon columns are optional in the signature: samples carry whatever taxa they have."""
    inferred = infer_signature(example, pipeline.predict_proba(example)[:, 1])
    inputs = Schema(
        [
            ColSpec(spec.type, spec.name, required=not schema.is_taxon(spec.name))
            for spec in inferred.inputs.inputs
        ]
    )
    return type(inferred)(inputs=inputs, outputs=inferred.outputs)


def cohort_dataset(X: pd.DataFrame, y: np.ndarray, target: str, source: Path,
                   fingerprint: str) -> Any:
    """A cohort as an MLflow dataset: schema, profile and digest (the cohort fingerprint),
    never the rows. The label is boolean so the schema has no integer column."""
    with warnings.catch_warnings():  # MLflow registers its local source class twice
        warnings.filterwarnings("ignore", "The specified dataset source", UserWarning)
        return mlflow.data.from_pandas(
            X.assign(**{target: np.asarray(y).astype(bool)}), source=str(Path(source).resolve()),
            targets=target, name=Path(source).name, digest=fingerprint[:20])


def log_model(pipeline: ResponseModel, X: pd.DataFrame, metadata: dict[str, Any]) -> Any:
    """Log the fitted pipeline to the active run in MLflow format (skops)."""
    example = example_input(X)
    return mlflow.sklearn.log_model(
        pipeline,
        name=MODEL_NAME,
        signature=_signature(pipeline, example),
        input_example=example,
        serialization_format="skops",
        skops_trusted_types=TRUSTED_TYPES,
        pyfunc_predict_fn="predict_proba",
        metadata={METADATA_KEY: metadata},
        pip_requirements=requirements(),
    )


def requirements() -> list[str]:
    """What loading and running the model needs, pinned to what trained it.

    Given explicitly, because MLflow otherwise re-imports the model in a subprocess to
    guess them (7.5 s and ~260 MiB per run, docs/benchmarks.md). The custom transformers
    live in this project's `training` package, which must be installed beside them.
    """
    import scipy
    import sklearn
    import xgboost

    modules = {"mlflow": mlflow, "scikit-learn": sklearn, "xgboost": xgboost, "skops": skops,
               "numpy": np, "pandas": pd, "scipy": scipy}
    return [f"{name}=={module.__version__}" for name, module in modules.items()]


def download(model_uri: str, destination: Path) -> Path:
    destination.mkdir(parents=True, exist_ok=True)
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri,
                                                    dst_path=str(destination)))


def register(model_uri: str, name: str, alias: str | None, sha256: str,
             description: str | None = None, model_description: str | None = None
             ) -> ModelVersion:
    """Create a registry version tagged with its digest and described by its model card,
    then point the alias at it.

    Runs last in training, so an earlier failure registers nothing; if the description or
    the alias cannot be set, the new version is removed again rather than left
    half-published.
    """
    version = mlflow.register_model(model_uri, name, tags={DIGEST_TAG: sha256})
    client = MlflowClient()
    try:
        if description:
            client.update_model_version(name, version.version, description=description)
        if model_description:
            client.update_registered_model(name, description=model_description)
        if alias:
            client.set_registered_model_alias(name, alias, version.version)
    except Exception:
        client.delete_model_version(name, version.version)
        raise
    return version


def resolve_version(model_uri: str) -> ModelVersion:
    """`models:/name@alias` or `models:/name/version` -> the registry's ModelVersion."""
    reference = model_uri.removeprefix("models:/")
    client = MlflowClient()
    if "@" in reference:
        name, alias = reference.split("@", 1)
        return client.get_model_version_by_alias(name, alias)
    name, _, version = reference.partition("/")
    if not version.isdigit():
        raise ValueError(f"model URI must be models:/<name>@<alias> or models:/<name>/<n>, "
                         f"got {model_uri!r}")
    return client.get_model_version(name, version)


def logged_model_id(version: ModelVersion) -> str | None:
    """The MLflow 3 logged model behind a registry version (its `source` is models:/m-...
    when `model_id` is not filled in, as with the SQL store)."""
    if getattr(version, "model_id", None):
        return version.model_id
    source = str(version.source or "")
    return source.removeprefix("models:/") if source.startswith("models:/m-") else None


def export_bundle(model_uri: str, out: Path, sign_key: Path | None = None) -> Path:
    """Write a registered model version as a self-contained local bundle, atomically.

    The bundle is assembled beside `out` and moved into place only when complete, so a
    failure leaves either the previous bundle or nothing, never a half-written one. It is
    readable by other users (directories 0755, files 0644: a container's service user is not
    the one who exported it). With `sign_key` (a PEM Ed25519 private key) it carries a
    signature of its name, version and digest, which a service configured with the public
    key requires.
    """
    version = resolve_version(model_uri)
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        download(f"models:/{version.name}/{version.version}", staging)
        actual = digest(staging)
        if actual != version.tags.get(DIGEST_TAG):
            raise ModelIntegrityError(
                f"{version.name} version {version.version}: files do not match the "
                f"registered digest"
            )
        info = {"name": version.name, "version": str(version.version), "run_id": version.run_id,
                "source": model_uri, DIGEST_TAG: actual}
        (staging / BUNDLE_FILE).write_text(json.dumps(info, indent=2) + "\n")
        if sign_key is not None:
            (staging / SIGNATURE_FILE).write_text(sign(info, sign_key) + "\n")
        _readable(staging)
        _replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _readable(directory: Path) -> None:
    directory.chmod(0o755)
    for path in directory.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


def _signed_message(info: dict[str, Any]) -> bytes:
    return f"{info['name']}\n{info['version']}\n{info[DIGEST_TAG]}".encode()


def sign(info: dict[str, Any], private_key: Path) -> str:
    """Base64 Ed25519 signature of a bundle's name, version and digest."""
    key = serialization.load_pem_private_key(private_key.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{private_key}: not an Ed25519 private key (make one with "
                         "`openssl genpkey -algorithm ed25519`)")
    return base64.b64encode(key.sign(_signed_message(info))).decode()


def verify_signature(directory: Path, info: dict[str, Any], public_key: Path) -> None:
    key = serialization.load_pem_public_key(public_key.read_bytes())
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{public_key}: not an Ed25519 public key")
    signature = directory / SIGNATURE_FILE
    if not signature.is_file():
        raise ModelIntegrityError(f"{directory}: unsigned bundle, and a signing key is "
                                  "configured; export it with `itp-train export --sign-key`")
    try:
        key.verify(base64.b64decode(signature.read_text().strip()), _signed_message(info))
    except (InvalidSignature, ValueError):
        raise ModelIntegrityError(f"{directory}: the bundle's signature does not verify with "
                                  f"{public_key.name}") from None


def _replace(new: Path, target: Path) -> None:
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    new.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def load(model_uri: str, expected_sha256: str | None = None, public_key: Path | None = None,
         check_registry: bool = False) -> StoredModel:
    """Load a model from `models:/...` or a bundle directory, verifying its digest first.

    A registry version's files are checked against the digest tag on the version. A bundle
    records its own digest, which on its own attests nothing (whoever edits the files can
    rewrite it), so a bundle is checked against, in turn: a signature (`public_key`), the
    registry version it came from (`check_registry`), a pinned `expected_sha256`. With none
    of them its integrity is "self-attested", and `StoredModel.integrity` says so.
    """
    if model_uri.startswith("models:/"):
        version = resolve_version(model_uri)
        with tempfile.TemporaryDirectory(prefix="itp-model-") as tmp:
            directory = download(f"models:/{version.name}/{version.version}", Path(tmp))
            return _load_directory(directory, model_uri, version.name, version.version,
                                   version.tags.get(DIGEST_TAG), expected_sha256, "registry")
    directory = Path(model_uri)
    if not (directory / BUNDLE_FILE).is_file():
        raise FileNotFoundError(f"{directory}: not a model bundle (no {BUNDLE_FILE}); "
                                f"create one with `itp-train export`")
    info = json.loads((directory / BUNDLE_FILE).read_text())
    checks = []
    if public_key is not None:
        verify_signature(directory, info, public_key)
        checks.append("signed")
    if check_registry:
        registered = MlflowClient().get_model_version(info["name"], info["version"])
        if registered.tags.get(DIGEST_TAG) != info.get(DIGEST_TAG):
            raise ModelIntegrityError(f"{model_uri}: the bundle's digest is not the one "
                                      f"registered for {info['name']} version "
                                      f"{info['version']}")
        checks.append("registry")
    if expected_sha256 is not None:
        checks.append("pinned")
    return _load_directory(directory, model_uri, info["name"], info["version"],
                           info.get(DIGEST_TAG), expected_sha256,
                           "+".join(checks) or "self-attested")


def _load_directory(
    directory: Path,
    source: str,
    name: str,
    version: str | None,
    recorded: str | None,
    expected: str | None,
    integrity: str,
) -> StoredModel:
    actual = digest(directory)
    if recorded is None:
        raise ModelIntegrityError(f"{source}: no recorded {DIGEST_TAG}; refusing to load an "
                                  f"unverifiable model (register it with itp-train)")
    for label, wanted in (("recorded", recorded), ("pinned", expected)):
        if wanted is not None and wanted != actual:
            raise ModelIntegrityError(f"{source}: model files do not match the {label} digest")
    model = skops.io.load(directory / MODEL_FILE, trusted=TRUSTED_TYPES)
    if not isinstance(model, ResponseModel):
        raise ModelIntegrityError(f"{source}: not a ResponseModel ({type(model).__name__}); "
                                  f"retrain it with this version of itp-train")
    mlmodel = Model.load(directory / "MLmodel")
    return StoredModel(
        model=model,
        name=name,
        version=str(version) if version is not None else None,
        run_id=mlmodel.run_id,
        source=source,
        digest=actual,
        metadata=(mlmodel.metadata or {}).get(METADATA_KEY, {}),
        integrity=integrity,
    )
