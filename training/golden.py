"""Golden predictions: a few synthetic patients scored at training, re-scored by the service.

A service that follows a registry alias loads whatever version the alias points to next.
Before it serves one, it re-scores these patients through its own compiled path and
compares with what training's scikit-learn pipeline and SHAP explainer gave: a model that
deserialises but scores differently (another library version, a broken compile step) is
refused rather than served.

The patients are aggregates, never a patient's row: per treatment group (of at least
`MIN_GROUP` episodes; the whole cohort otherwise), the median of each number (rounded to
`SIGNIFICANT` significant digits), the majority of each yes/no, the most frequent category
and the mean reads of each taxon. A field measured in fewer than `MIN_GROUP` episodes of
the group is left out (missing), since its "median" would be one patient's value; a cohort
under `MIN_GROUP` episodes gets no golden patients at all (the service then reports the
golden check as skipped). They carry no identifiers and go into the model's MLmodel
metadata, so the model digest covers them.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from training.explain import ShapExplainer
from training.features import model_input
from training.schema import CLINICAL_FIELDS, TREATMENT, Kind, is_taxon
from training.tuning import ResponseModel

GOLDEN_KEY = "golden"
FORMAT = 1
MAX_PATIENTS = 5
MIN_GROUP = 10  # episodes behind an aggregate, so that no one patient shows through
SIGNIFICANT = 2  # digits kept of a median: coarse, so no one patient's value shows through
MAX_TAXA = 50  # the most abundant taxa of each aggregate: the metadata stays small


def golden_patients(X: pd.DataFrame, treatments: list[str]) -> list[dict[str, Any]]:
    """Request-shaped patients (as POST /v1/predict takes them), aggregated from `X`.

    One per treatment the model knows (the most frequent first, up to `MAX_PATIENTS` - 1),
    and one with only the required field, so missing-value handling is covered too.
    """
    if len(X) < MIN_GROUP:  # no aggregate hides one patient: no golden record
        return []
    taxa = [c for c in X.columns if is_taxon(c)]
    counts = bool(taxa) and bool((X[taxa].fillna(0) % 1 == 0).all().all())
    frequent = X[TREATMENT].value_counts()
    chosen = [t for t in frequent.index if t in treatments][:MAX_PATIENTS - 1]
    patients = []
    for treatment in chosen:
        group = X[X[TREATMENT] == treatment]
        rows = group if len(group) >= MIN_GROUP else X
        patients.append({"patient_id": f"golden-{len(patients) + 1}", "treatment": treatment,
                         "clinical": _clinical(rows),
                         "microbiome": {"counts": _reads(rows[taxa], counts)}})
    if chosen:
        platelets = _coarse(float(X["baseline_platelets"].median()))
        patients.append({"patient_id": f"golden-{len(patients) + 1}", "treatment": chosen[0],
                         "clinical": {"baseline_platelets": platelets},
                         "microbiome": {"counts": _reads(X[taxa], counts)}})
    return patients


def _clinical(rows: pd.DataFrame) -> dict[str, Any]:
    clinical: dict[str, Any] = {}
    for field in CLINICAL_FIELDS:
        if field.name in ("bleeding_score", "bleeding_scale"):
            continue
        values = rows[field.name].dropna()
        if len(values) < MIN_GROUP:  # measured in too few: leave it missing
            continue
        if field.kind == Kind.NUMBER:
            clinical[field.name] = _coarse(float(values.median()))
        elif field.kind == Kind.BOOLEAN:
            clinical[field.name] = bool(values.astype(float).mean() >= 0.5)
        else:
            clinical[field.name] = str(values.mode().iloc[0])
    bleeding = rows[["bleeding_score", "bleeding_scale"]].dropna()
    # score and scale together (a WHO grade on the ITP-BAT scale fails), from enough episodes
    if len(bleeding) >= MIN_GROUP:
        score, scale = bleeding.value_counts().index[0]
        clinical |= {"bleeding_score": str(score), "bleeding_scale": str(scale)}
    return clinical


def _coarse(value: float) -> float:
    """`value` to `SIGNIFICANT` significant digits (37.25 -> 37.0, 0.01234 -> 0.012)."""
    return float(f"{value:.{SIGNIFICANT}g}")


def _reads(taxa: pd.DataFrame, counts: bool) -> dict[str, float]:
    means = taxa.fillna(0).mean(axis=0).nlargest(MAX_TAXA)
    reads = {str(t): float(round(m) if counts else m) for t, m in means.items() if m > 0}
    return {t: r for t, r in reads.items() if r > 0} or {str(means.idxmax()): 1.0}


def frame(patients: list[dict[str, Any]]) -> pd.DataFrame:
    """Request-shaped patients -> the pipeline's input frame (as the service builds it)."""
    index = pd.Index([str(i) for i in range(len(patients))])
    clinical = pd.DataFrame(
        [{TREATMENT: p["treatment"], **p["clinical"]} for p in patients], index=index
    ).reindex(columns=[TREATMENT, *(f.name for f in CLINICAL_FIELDS)])
    for field in CLINICAL_FIELDS:
        if field.kind == Kind.BOOLEAN:
            clinical[field.name] = clinical[field.name].astype(float)
    reads = pd.DataFrame([p["microbiome"]["counts"] for p in patients], index=index)
    return model_input(clinical, reads.fillna(0.0))


def golden_record(model: ResponseModel, X: pd.DataFrame) -> dict[str, Any]:
    """The golden patients with the probabilities and exact SHAP values training gives
    them (for the model's MLmodel metadata)."""
    treatments = list(model.pipeline_.named_steps["features"]
                      .named_transformers_["clinical"].treatments_)
    patients = golden_patients(X, treatments)
    if not patients:
        return {}
    inputs = frame(patients)
    explanation = ShapExplainer(model).explain(inputs)
    probability = model.predict_proba(inputs)[:, 1]
    return {
        "format": FORMAT,
        "patients": patients,
        "probability": [float(p) for p in probability],
        "base_value": float(explanation.base_value),
        "shap": [{str(name): float(value) for name, value in
                  zip(explanation.feature_names, row, strict=True) if value != 0}
                 for row in np.asarray(explanation.shap_values)],  # absent: exactly zero
    }

