"""Exact SHAP explanations of a fitted model, in recalibrated log-odds, per input feature.

Training (summary plot, stability across folds) and the service (per-patient explanations)
use this one class, so what the MLflow UI shows and what the API returns are the same numbers.

SHAP is computed on the estimator's design matrix, then summed over the design columns that
come from one input feature (a marker's main effect and its treatment interactions, a
missing-value indicator and its field). Sums of exact SHAP values are exact, and a clinician
reads "IPF 14 %: +0.4", not a standardised interaction column. A `ResponseModel` is affine in
its pipelines' log-odds (intercept + slope * margin, plus the stacked forest's weight * its
margin), so its SHAP values are the pipelines' times their weights, and its base value is
intercept + the weighted sum of their base values: base + sum(contributions) is the served,
recalibrated log-odds exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.special import expit
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from xgboost import XGBClassifier

from training import schema
from training.structure import source_feature
from training.tuning import ResponseModel

INPUT_STEPS = ("align", "features", "blocks")  # raw inputs -> named features in their units


@dataclass(frozen=True)
class Explanation:
    """SHAP values for n episodes over p named input features."""

    feature_names: np.ndarray  # (p,)
    values: np.ndarray  # (n, p) feature values in their own units (NaN = missing)
    shap_values: np.ndarray  # (n, p) contributions to the log-odds of response
    base_value: float  # log-odds of the reference (average training) episode
    relative_abundance: np.ndarray  # (n, p) share of reads of taxon features, NaN otherwise

    @property
    def log_odds(self) -> np.ndarray:
        """base + sum of contributions: exactly the model's log-odds, in float64."""
        return self.base_value + self.shap_values.sum(axis=1)

    @property
    def probability(self) -> np.ndarray:
        return expit(self.log_odds)

    def mean_abs(self) -> pd.Series:
        """Global importance: mean |SHAP| per feature, largest first."""
        return pd.Series(np.abs(self.shap_values).mean(axis=0),
                         index=self.feature_names).sort_values(ascending=False)


class ShapExplainer:
    """Exact SHAP for the estimators we ship; built once, then cheap per call.

    Trees: TreeExplainer (path-dependent, no background needed; equals xgboost's own
    `pred_contribs`). Linear: LinearExplainer against the all-zero design row, which after
    standardisation is the training mean, so the base value is the intercept. A stacked
    `ResponseModel` is a weighted sum of its members' log-odds, so its SHAP values are the
    same weighted sum of theirs (members share their input features).
    """

    def __init__(self, model: ResponseModel | Pipeline) -> None:
        if isinstance(model, ResponseModel):
            members, self.shift = model.members(), model.intercept_
        else:
            members, self.shift = [(model, 1.0)], 0.0
        self._members = [_Member(pipeline, weight) for pipeline, weight in members]
        first = self._members[0]
        self.pipeline, self.inputs, self.input_names = first.pipeline, first.inputs, first.names
        if any(list(m.names) != list(self.input_names) for m in self._members[1:]):
            raise TypeError("stacked models must share their input features")

    def explain(self, X: pd.DataFrame) -> Explanation:
        inputs = self.inputs.transform(X)
        shap_values, base = np.zeros((len(X), len(self.input_names))), self.shift
        for member in self._members:
            values, member_base = member.explain(X)
            shap_values += member.weight * values
            base += member.weight * member_base
        return Explanation(
            feature_names=self.input_names,
            values=np.asarray(inputs, dtype=np.float64),
            shap_values=shap_values,
            base_value=base,
            relative_abundance=self._relative_abundance(X),
        )

    def _relative_abundance(self, X: pd.DataFrame) -> np.ndarray:
        """Each feature taxon's share of all the profile's reads, taxa the model does not
        know included (what the lab measured, not what the model kept)."""
        total = X[[c for c in X.columns if schema.is_taxon(c)]].sum(axis=1)
        aligned = self.pipeline.named_steps["align"].transform(X)
        reads = aligned[[c for c in aligned.columns if schema.is_taxon(c)]]
        shares = reads.div(total.replace(0, np.nan), axis=0)
        return shares.reindex(columns=self.input_names).to_numpy(dtype=np.float64)


class _Member:
    """One pipeline's exact SHAP values, summed per input feature, with its weight in the
    served log-odds."""

    def __init__(self, pipeline: Pipeline, weight: float) -> None:
        estimator = pipeline[-1]
        if not isinstance(estimator, XGBClassifier | LogisticRegression):
            raise TypeError(f"no exact SHAP explainer for {type(estimator).__name__}")
        import shap  # here, not at import: the service scores without it

        self.pipeline, self.weight = pipeline, weight
        self.inputs, self.design = split_pipeline(pipeline)
        self.names, self._groups = design_groups(pipeline)
        if isinstance(estimator, XGBClassifier):
            self._explainer = shap.TreeExplainer(estimator)
        else:
            background = np.zeros((1, len(self._groups)))  # one entry per design column
            self._explainer = shap.LinearExplainer(
                estimator, shap.maskers.Independent(background)
            )

    def explain(self, X: pd.DataFrame) -> tuple[np.ndarray, float]:
        """(SHAP per input feature, base value), in the pipeline's own log-odds."""
        # The call API returns the base value with the values: TreeExplainer's
        # `expected_value` attribute is only logit(base_score) for xgboost until a first
        # explanation has replaced it with the booster's real bias.
        result = self._explainer(self.design.transform(self.inputs.transform(X)))
        design_shap = np.asarray(result.values, dtype=np.float64)
        grouped = np.zeros((len(X), len(self.names)))
        np.add.at(grouped.T, self._groups, design_shap.T)
        return grouped, float(np.ravel(result.base_values)[0])


def split_pipeline(pipeline: Pipeline) -> tuple[Pipeline, Pipeline]:
    """(raw inputs -> named input features, named features -> the estimator's design)."""
    steps = [name for name, _ in pipeline.steps]
    inputs = pipeline[: max(steps.index(s) for s in INPUT_STEPS) + 1]
    return inputs, pipeline[len(inputs): -1]


def design_groups(pipeline: Pipeline) -> tuple[np.ndarray, np.ndarray]:
    """The named input features, and for each design column the input feature it comes
    from (a field's interactions and missing-value indicator belong to the field)."""
    inputs, design = split_pipeline(pipeline)
    input_names = np.asarray(inputs.get_feature_names_out(), dtype=object)
    position = {str(name): i for i, name in enumerate(input_names)}
    design_names = design.get_feature_names_out(input_names)
    return input_names, np.array([position[source_feature(str(n))] for n in design_names])


# Encoded clinical columns that are not fields of their own (training.features.ClinicalEncoder)
# and the diversity indices, as a clinician names them. The indices are computed at the
# model's coarsest rank (genus, or species at rank species), whatever their feature names say.
_DERIVED_LABELS: dict[str, str] = {
    "bleeding_severity": "Bleeding severity",
    "shannon_diversity": "Shannon diversity",
    "observed_genera": "Richness (taxa observed)",
}
_INDICATOR_LABELS: dict[str, str] = {schema.TREATMENT: "Treatment", "phase": "ITP phase",
                                     "sex": "Sex"}


def display_name(feature: str) -> str:
    """A readable label: the deepest rank name of a lineage, a clinical field's clinical name
    ("Thrombopoietin (TPO)"), an indicator as "Treatment: IVIG"; else the feature itself."""
    if schema.is_taxon(feature):
        last = feature.split(";")[-1]
        prefix, _, name = last.partition("__")
        rank = schema.RANK_PREFIXES.get(prefix, "taxon")
        return f"{name.replace('_', ' ')} ({rank})"
    field, _, level = feature.partition("=")
    if level and field in _INDICATOR_LABELS:
        shown = schema.TREATMENT_LABELS.get(level, level) if field == schema.TREATMENT else level
        return f"{_INDICATOR_LABELS[field]}: {shown.replace('_', ' ')}"
    if feature in schema.CLINICAL_BY_NAME:
        return schema.CLINICAL_BY_NAME[feature].label or feature
    return _DERIVED_LABELS.get(feature, feature)


def feature_unit(feature: str) -> str | None:
    """The unit a feature's value is in: CLR for taxa, the clinical field's unit, else none."""
    if schema.is_taxon(feature):
        return "CLR"
    field = schema.CLINICAL_BY_NAME.get(feature)
    return field.unit if field else None
