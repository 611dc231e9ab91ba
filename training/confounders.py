"""Confounder report: every metadata variable against the label, before trusting a model.

As SIAMCAT's `check.confounders`: a model can learn a sequencing batch, a site or recent
antibiotics instead of biology when those differ between responders and non-responders.
Each variable gets a test (Mann-Whitney for numbers, chi-square for categories), an effect
size (Cliff's delta, Cramér's V), a single-variable AUROC and a Benjamini-Hochberg q-value;
technical and known-confounding variables (batch, site, run, country, antibiotics, read
depth) are flagged whatever their p-value, and warned about when they are associated.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
from scipy.stats import chi2_contingency, false_discovery_control, mannwhitneyu
from sklearn.metrics import roc_auc_score

from training import schema

TECHNICAL = re.compile(r"(^|_)(batch|site|cent(er|re)|run|plate|lane|country|extraction)"
                       r"(_|$)|antibiotic|read_depth", re.IGNORECASE)
NOT_COVARIATES = {schema.SAMPLE_ID, schema.SUBJECT_ID, "response",
                  *(f.name for f in schema.OUTCOME_FIELDS)}
Q_WARN = 0.05


def confounder_report(metadata: pd.DataFrame, counts: pd.DataFrame, y: np.ndarray
                      ) -> pd.DataFrame:
    """One row per metadata variable (plus read depth): test, effect, AUROC, q, flag."""
    y = np.asarray(y)
    columns = {c: metadata[c] for c in metadata.columns if c not in NOT_COVARIATES}
    columns["read_depth"] = counts.reindex(metadata.index).sum(axis=1)
    rows = [row for name, values in columns.items()
            if (row := _association(name, values, y)) is not None]
    report = pd.DataFrame(rows)
    if report.empty:
        return report
    report["q_value"] = false_discovery_control(report["p_value"].to_numpy())
    report["flagged"] = report["variable"].map(lambda v: bool(TECHNICAL.search(v)))
    return report.sort_values("p_value").reset_index(drop=True)


def _association(name: str, values: pd.Series, y: np.ndarray) -> dict[str, object] | None:
    known = values.notna().to_numpy()
    if known.sum() < 10 or values[known].nunique() < 2 or len(np.unique(y[known])) < 2:
        return None
    v, labels = values[known], y[known]
    numeric = pd.api.types.is_numeric_dtype(v) and v.nunique() > 2
    if numeric:
        x = v.to_numpy(dtype=float)
        auroc = roc_auc_score(labels, x)
        p = mannwhitneyu(x[labels == 1], x[labels == 0]).pvalue
        return {"variable": name, "kind": "numeric", "n": int(known.sum()),
                "test": "Mann-Whitney U", "p_value": float(p),
                "effect": "Cliff's delta", "effect_size": 2 * auroc - 1, "auroc": auroc}
    table = pd.crosstab(v.astype(str), labels)
    chi2, p, _, _ = chi2_contingency(table, correction=False)
    cramers_v = float(np.sqrt(chi2 / (table.to_numpy().sum() * (min(table.shape) - 1))))
    rate = v.astype(str).map(table[1] / table.sum(axis=1)).to_numpy(dtype=float)
    return {"variable": name, "kind": "category", "n": int(known.sum()),
            "test": "chi-square", "p_value": float(p), "effect": "Cramér's V",
            "effect_size": cramers_v, "auroc": roc_auc_score(labels, rate)}


def confounder_warnings(report: pd.DataFrame) -> list[str]:
    """Flagged (technical or confounding) variables associated with the label."""
    if report.empty:
        return []
    hits = report[report["flagged"] & (report["q_value"] < Q_WARN)]
    return [f"{r.variable} is associated with the label (q={r.q_value:.3g}, single-variable "
            f"AUROC {r.auroc:.2f}): check it is not what the model learns"
            for r in hits.itertuples()]
