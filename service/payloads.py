"""Cohort rows -> `/v1/predict` patients: score a cohort file through the API."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from training.schema import CLINICAL_FIELDS, TREATMENT, Kind


def patient_payloads(metadata: pd.DataFrame, counts: pd.DataFrame) -> list[dict[str, Any]]:
    """One request patient per episode of a loaded cohort (`training.cohort.load_cohort`).

    Missing values are left out, as a caller would; only taxa with reads are sent.
    """
    patients = []
    for sample, row in metadata.iterrows():
        clinical: dict[str, Any] = {}
        for field in CLINICAL_FIELDS:
            value = row.get(field.name)
            if value is None or (isinstance(value, float) and math.isnan(value)):
                continue
            clinical[field.name] = bool(value) if field.kind == Kind.BOOLEAN else value
        reads = {str(t): float(c) for t, c in counts.loc[sample].items() if c > 0}
        patients.append({"patient_id": str(sample), "treatment": row[TREATMENT],
                         "clinical": clinical, "microbiome": {"counts": reads}})
    return patients
