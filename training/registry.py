"""Model storage in MLflow: logging, registry versions and aliases, exporting bundles.

What a model is on disk, its digest, signature and safe loading live in `training.bundle`
(re-exported here); this module adds the MLflow registry around them.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import skops.io
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.models.signature import infer_signature
from mlflow.types.schema import ColSpec, Schema

from training import schema
from training.bundle import (  # noqa: F401 - re-exported: the registry's public names
    BUNDLE_FILE,
    DIGEST_TAG,
    DIGESTED_FILES,
    METADATA_KEY,
    MODEL_FILE,
    SIGNATURE_FILE,
    TRUSTED_TYPES,
    ModelIntegrityError,
    StoredModel,
    digest,
    load_bundle,
    load_directory,
    make_readable,
    sign,
    verify_signature,
)
from training.tuning import ResponseModel

MODEL_NAME = "model"  # name of the logged model within a run


_BOOLEANS = {f.name for f in schema.CLINICAL_FIELDS if f.kind == schema.Kind.BOOLEAN}


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
                f"registered digest", kind="digest_mismatch"
            )
        info = {"name": version.name, "version": str(version.version), "run_id": version.run_id,
                "source": model_uri, DIGEST_TAG: actual}
        (staging / BUNDLE_FILE).write_text(json.dumps(info, indent=2) + "\n")
        if sign_key is not None:
            (staging / SIGNATURE_FILE).write_text(sign(info, sign_key) + "\n")
        make_readable(staging)
        _replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _replace(new: Path, target: Path) -> None:
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    new.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def load(model_uri: str, expected_sha256: str | None = None, public_key: Path | None = None,
         check_registry: bool = False) -> StoredModel:
    """Load a model from `models:/...` or a bundle directory, verifying its digest first:
    a registry version's files against the digest tag on the version, a bundle as
    `training.bundle.load_bundle` says (with `check_registry`, against the registry version
    it was exported from)."""
    if not model_uri.startswith("models:/"):
        return load_bundle(Path(model_uri), expected_sha256, public_key,
                           _registered_digest if check_registry else None)
    version = resolve_version(model_uri)
    with tempfile.TemporaryDirectory(prefix="itp-model-") as tmp:
        directory = download(f"models:/{version.name}/{version.version}", Path(tmp))
        return load_directory(directory, model_uri, version.name, version.version,
                              version.tags.get(DIGEST_TAG), expected_sha256, "registry")


def _registered_digest(name: str, version: str) -> str | None:
    return MlflowClient().get_model_version(name, version).tags.get(DIGEST_TAG)
