"""Exact SHAP explanations of a fitted pipeline, in log-odds.

Training (summary plot) and the service (per-patient explanations) use this one class, so
what the MLflow UI shows and what the API returns are the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import shap
from scipy.special import expit
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from xgboost import XGBClassifier


@dataclass(frozen=True)
class Explanation:
    """SHAP values for n episodes over p named features."""

    feature_names: np.ndarray  # (p,)
    values: np.ndarray  # (n, p) feature values in their own units (NaN = missing)
    shap_values: np.ndarray  # (n, p) contributions to the log-odds of response
    base_value: float  # log-odds of the reference (average training) episode

    @property
    def log_odds(self) -> np.ndarray:
        """base + sum of contributions: exactly the model's log-odds, in float64."""
        return self.base_value + self.shap_values.sum(axis=1)

    @property
    def probability(self) -> np.ndarray:
        return expit(self.log_odds)


class ShapExplainer:
    """Exact SHAP for the estimators we ship; built once, then cheap per call.

    Trees: TreeExplainer (path-dependent, no background needed; equals xgboost's own
    `pred_contribs`). Linear: LinearExplainer against the all-zero row, which after the
    pipeline's StandardScaler is the training mean, so base_value is the intercept.
    """

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self.preprocess = pipeline[:-1]
        self.feature_names = np.asarray(self.preprocess.get_feature_names_out(), dtype=object)
        estimator = pipeline[-1]
        if isinstance(estimator, XGBClassifier):
            self._explainer = shap.TreeExplainer(estimator)
        elif isinstance(estimator, LogisticRegression):
            background = np.zeros((1, len(self.feature_names)))
            self._explainer = shap.LinearExplainer(
                estimator, shap.maskers.Independent(background)
            )
        else:
            raise TypeError(f"no exact SHAP explainer for {type(estimator).__name__}")

    def explain(self, X: pd.DataFrame) -> Explanation:
        transformed = self.preprocess.transform(X)
        # The call API returns the base value with the values: TreeExplainer's
        # `expected_value` attribute is only logit(base_score) for xgboost until a first
        # explanation has replaced it with the booster's real bias.
        result = self._explainer(transformed)
        return Explanation(
            feature_names=self.feature_names,
            values=self._in_feature_units(transformed),
            shap_values=np.asarray(result.values, dtype=np.float64),
            base_value=float(np.ravel(result.base_values)[0]),
        )

    def _in_feature_units(self, transformed: np.ndarray) -> np.ndarray:
        """Undo standardisation so values read as CLR, years, pg/mL... not z-scores.

        Imputed cells go back to NaN: the explanation shows what the patient gave, not the
        training median the linear model filled in.
        """
        scaler = self.preprocess.named_steps.get("scale")
        if scaler is None:
            return np.asarray(transformed, dtype=np.float64)
        values = np.asarray(scaler.inverse_transform(transformed), dtype=np.float64)
        position = {name: i for i, name in enumerate(self.feature_names)}
        for i, name in enumerate(self.feature_names):
            imputed = position.get(str(name).removeprefix("missingindicator_"))
            if str(name).startswith("missingindicator_") and imputed is not None:
                values[values[:, i] == 1, imputed] = np.nan
        return values
