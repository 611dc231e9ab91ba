"""The served model: loaded and verified once, then turns validated requests into predictions."""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from service.loading import alias_of
from service.schemas import (
    Contribution,
    Explanation,
    ModelInfo,
    ModelRef,
    OtherFeatures,
    Patient,
    Prediction,
    PredictionWarning,
    Recalibration,
)
from service.scoring import CompiledModel
from service.settings import Settings
from training.bundle import ModelIntegrityError, StoredModel, load_bundle
from training.explain import Explanation as ShapResult
from training.explain import display_name, feature_unit
from training.features import feature_schema, model_input
from training.schema import CLINICAL_FIELDS, TREATMENT

LOW_READS = 1000
log = logging.getLogger("service")


@dataclass(frozen=True)
class LoadedModel:
    stored: StoredModel
    compiled: CompiledModel
    checks: dict[str, str] = field(default_factory=dict)  # service.checks, before serving

    @property
    def ref(self) -> ModelRef:
        return ModelRef(name=self.stored.name, version=self.stored.version,
                        run_id=self.stored.run_id, alias=self.alias)

    @property
    def alias(self) -> str | None:
        """The registry alias this model was loaded through (models:/<name>@<alias>), if
        any: the version is the one the alias named when it was loaded."""
        named = alias_of(self.stored.source)
        return named[1] if named else None

    @property
    def integrity(self) -> str:
        return self.stored.integrity

    def info(self, last_reload_failure: dict[str, Any] | None = None,
             follow: dict[str, Any] | None = None) -> ModelInfo:
        meta = self.stored.metadata
        model = self.stored.model
        return ModelInfo(
            name=self.stored.name, version=self.stored.version, run_id=self.stored.run_id,
            alias=self.alias, sha256=self.stored.digest, integrity=self.integrity,
            last_reload_failure=last_reload_failure, checks=self.checks, follow=follow,
            candidate=meta.get("candidate"), trained_at=meta.get("trained_at"),
            definition=meta.get("definition"), target=meta.get("target"),
            cv_metrics=meta.get("cv_metrics", {}),
            microbiome_added_value=meta.get("microbiome_added_value", {}),
            recalibration=Recalibration(intercept=model.intercept_, slope=model.slope_,
                                        forest_slope=model.companion_slope_),
            threshold=model.threshold_, warnings=meta.get("warnings", []),
            feature_schema=self.schema,
        )

    @property
    def threshold(self) -> float:
        """The decision threshold chosen in training (on out-of-fold predictions)."""
        return float(self.stored.model.threshold_)

    @cached_property
    def schema(self) -> dict[str, Any]:
        """Read off the fitted pipeline itself (the object that predicts is the authority),
        plus what only the training data knew: the profiles' source and abundance kind."""
        recorded = self.stored.metadata.get("feature_schema", {})
        return feature_schema(self.stored.model) | {
            key: recorded[key] for key in ("abundance", "profile_source") if key in recorded}

    @cached_property
    def treatments(self) -> list[str]:
        return list(self.schema["treatments"])

    @cached_property
    def training_ranges(self) -> dict[str, list[float]]:
        return {f["name"]: f["training_range"] for f in self.schema["clinical"]
                if f.get("training_range")}

    def predict(
        self, patients: list[Patient], explain: bool, top_k: int, threshold: float
    ) -> list[Prediction]:
        scored = self.compiled.score(patients, explain)
        explanation, probabilities = scored.explanation, scored.probability
        return [
            Prediction(
                patient_id=patient.patient_id,
                probability=float(probabilities[i]),
                label="responder" if probabilities[i] >= threshold else "non-responder",
                explanation=_top(explanation, i, top_k) if explain else None,
                taxa_matched=float(scored.taxa_matched[i]),
                warnings=self._warnings(patient, scored.unknown[i]),
            )
            for i, patient in enumerate(patients)
        ]

    def _warnings(self, patient: Patient, unknown: dict[str, float]) -> list[PredictionWarning]:
        warnings = []
        if unknown:
            listed = ", ".join(f"{taxon} ({share:.1%})" for taxon, share in
                               sorted(unknown.items(), key=lambda kv: -kv[1])[:5])
            warnings.append(PredictionWarning(
                code="unknown_taxa",
                message=f"{len(unknown)} taxa unknown to the model, {sum(unknown.values()):.1%} "
                        f"of reads, were not used: {listed}"
                        + (" ..." if len(unknown) > 5 else ""),
            ))
        clinical = patient.clinical.model_dump()
        outside = []
        for name, value in clinical.items():
            bounds = self.training_ranges.get(name)
            if isinstance(value, float) and bounds and not bounds[0] <= value <= bounds[1]:
                outside.append(f"{name}={value:g} (trained on {bounds[0]:g}-{bounds[1]:g})")
        if outside:
            warnings.append(PredictionWarning(
                code="outside_training_range",
                message="values outside the training data; the model extrapolates: "
                        + ", ".join(outside),
            ))
        missing = [name for name, value in clinical.items() if value is None]
        if missing:
            warnings.append(PredictionWarning(
                code="missing_fields",
                message="not given, handled as missing: " + ", ".join(missing),
            ))
        total = sum(patient.microbiome.counts.values())
        if self.schema.get("abundance") == "counts" and not _looks_like_counts(patient):
            warnings.append(PredictionWarning(
                code="abundance_kind",
                message="the model was trained on read counts; this profile holds relative "
                        "abundances (closed to proportions the same way, but a count profile "
                        "is what the model saw)",
            ))
        if total >= 1 and total < LOW_READS and _looks_like_counts(patient):
            warnings.append(PredictionWarning(
                code="low_read_depth",
                message=f"{total:.0f} reads: profiles under {LOW_READS} reads are noisy",
            ))
        return warnings


def _looks_like_counts(patient: Patient) -> bool:
    return all(float(v).is_integer() for v in patient.microbiome.counts.values())


def inputs(patients: list[Patient]) -> pd.DataFrame:
    """Validated patients -> the raw frame the pipeline was trained on."""
    index = pd.Index([str(i) for i in range(len(patients))])
    clinical = pd.DataFrame(
        [{TREATMENT: p.treatment, **p.clinical.model_dump()} for p in patients], index=index
    ).reindex(columns=[TREATMENT, *(f.name for f in CLINICAL_FIELDS)])
    counts = pd.DataFrame([p.microbiome.counts for p in patients], index=index).fillna(0.0)
    return model_input(clinical, counts)


def _finite(value: float) -> float | None:
    return None if math.isnan(value) else value


def _top(explanation: ShapResult, row: int, top_k: int) -> Explanation:
    shap_values = explanation.shap_values[row]
    order = np.argsort(-np.abs(shap_values), kind="stable")
    shown, rest = order[:top_k], order[top_k:]
    return Explanation(
        base_value=explanation.base_value,
        contributions=[
            Contribution(
                feature=(name := str(explanation.feature_names[j])),
                label=display_name(name),
                unit=feature_unit(name),
                value=_finite(float(explanation.values[row, j])),
                relative_abundance_pct=_finite(100 * float(
                    explanation.relative_abundance[row, j])),
                shap=float(shap_values[j]),
            )
            for j in shown
        ],
        other_features=OtherFeatures(count=len(rest), shap=float(shap_values[rest].sum())),
    )


def load_model(settings: Settings) -> LoadedModel:
    """Fetch, verify and deserialise the configured model, and compile its scoring path."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # an unreachable tracking server fails one attempt in seconds; the slot retries
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    if settings.bundle_public_key is not None and settings.model_uri.startswith("models:/"):
        raise ModelIntegrityError("ITP_BUNDLE_PUBLIC_KEY is set, so only signed bundles are "
                                  "served; export one with `itp-train export --sign-key` and "
                                  "point ITP_MODEL_URI at it")
    if settings.tracking_uri or settings.model_uri.startswith("models:/"):
        import mlflow  # only for the registry: a bundle alone loads without it

        from training import registry

        if settings.tracking_uri:
            check_tracking_uri(settings.tracking_uri)
            mlflow.set_tracking_uri(settings.tracking_uri)
        stored = registry.load(settings.model_uri, settings.model_sha256,
                               public_key=settings.bundle_public_key,
                               check_registry=bool(settings.tracking_uri))
    else:
        stored = load_bundle(Path(settings.model_uri), settings.model_sha256,
                             public_key=settings.bundle_public_key)
    if stored.integrity == "self-attested":
        log.warning("bundle %s is checked only against its own bundle.json: set "
                    "ITP_MODEL_SHA256, ITP_BUNDLE_PUBLIC_KEY or MLFLOW_TRACKING_URI to verify "
                    "it", settings.model_uri)
    return LoadedModel(stored=stored, compiled=CompiledModel(stored.model))


def check_tracking_uri(uri: str) -> None:
    """A SQLite store must exist: MLflow would silently create an empty one."""
    if uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///"))
        if not path.is_file():
            raise FileNotFoundError(f"tracking store {uri}: no such database file; "
                                    "point MLFLOW_TRACKING_URI at the one training wrote")
