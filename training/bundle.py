"""Model files: what a model is on disk, its digest and signature, and loading it safely.

A model is an MLflow sklearn-flavour directory serialised with skops, never pickle: skops
rebuilds only types on an allow-list, and that allow-list is `TRUSTED_TYPES` below, in our
code, not the one a model directory declares about itself (which is what
`mlflow.sklearn.load_model` would trust). A SHA-256 digest of the model files is stored as a
tag on the registry version and in a bundle's `bundle.json`, and checked before loading.

This module needs no MLflow: the service loads a bundle without importing it (seconds of
start-up); `training.registry` adds the registry around it.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import skops.io
import yaml
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from training.tuning import ResponseModel

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


class ModelIntegrityError(RuntimeError):
    """The model files are not the ones that were registered or exported. `kind` is the
    short public reason (`digest_mismatch`, `signature_invalid` or `integrity_error`): the
    message may name hosts and paths, the kind never does."""

    def __init__(self, message: str, kind: str = "integrity_error") -> None:
        super().__init__(message)
        self.kind = kind


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
    return _digest({name: (directory / name).read_bytes() for name in DIGESTED_FILES})


def _digest(files: dict[str, bytes]) -> str:
    outer = hashlib.sha256()
    for name in DIGESTED_FILES:
        outer.update(name.encode())
        outer.update(hashlib.sha256(files[name]).digest())
    return outer.hexdigest()


def make_readable(directory: Path) -> None:
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
                                  f"{public_key.name}", kind="signature_invalid") from None


def load_bundle(directory: Path, expected_sha256: str | None = None,
                public_key: Path | None = None,
                registered_digest: Any = None) -> StoredModel:
    """A bundle directory, its digest checked against, in turn: a signature (`public_key`),
    the registry version it came from (`registered_digest(name, version)`), a pinned
    `expected_sha256`. With none of them its integrity is "self-attested", and
    `StoredModel.integrity` says so: a digest recorded beside the files attests nothing on
    its own (whoever edits the files can rewrite it)."""
    if not (directory / BUNDLE_FILE).is_file():
        raise FileNotFoundError(f"{directory}: not a model bundle (no {BUNDLE_FILE}); "
                                f"create one with `itp-train export`")
    info = json.loads((directory / BUNDLE_FILE).read_text())
    checks = []
    if public_key is not None:
        verify_signature(directory, info, public_key)
        checks.append("signed")
    if registered_digest is not None:
        if registered_digest(info["name"], info["version"]) != info.get(DIGEST_TAG):
            raise ModelIntegrityError(f"{directory}: the bundle's digest is not the one "
                                      f"registered for {info['name']} version "
                                      f"{info['version']}", kind="digest_mismatch")
        checks.append("registry")
    if expected_sha256 is not None:
        checks.append("pinned")
    return load_directory(directory, str(directory), info["name"], info["version"],
                          info.get(DIGEST_TAG), expected_sha256,
                          "+".join(checks) or "self-attested")


def load_directory(
    directory: Path,
    source: str,
    name: str,
    version: str | None,
    recorded: str | None,
    expected: str | None,
    integrity: str,
) -> StoredModel:
    # read once: what is hashed is what is loaded, whatever happens on disk meanwhile
    files = {name: (directory / name).read_bytes() for name in DIGESTED_FILES}
    actual = _digest(files)
    if recorded is None:
        raise ModelIntegrityError(f"{source}: no recorded {DIGEST_TAG}; refusing to load an "
                                  f"unverifiable model (register it with itp-train)")
    for label, wanted in (("recorded", recorded), ("pinned", expected)):
        if wanted is not None and wanted != actual:
            raise ModelIntegrityError(f"{source}: model files do not match the {label} digest",
                                      kind="digest_mismatch")
    model = skops.io.loads(files[MODEL_FILE], trusted=TRUSTED_TYPES)
    if not isinstance(model, ResponseModel):
        raise ModelIntegrityError(f"{source}: not a ResponseModel ({type(model).__name__}); "
                                  f"retrain it with this version of itp-train")
    # MLflow's own format; libyaml's parser where present (the golden patients make it large)
    mlmodel = yaml.load(files["MLmodel"], Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    return StoredModel(
        model=model,
        name=name,
        version=str(version) if version is not None else None,
        run_id=mlmodel.get("run_id"),
        source=source,
        digest=actual,
        metadata=(mlmodel.get("metadata") or {}).get(METADATA_KEY, {}),
        integrity=integrity,
    )
