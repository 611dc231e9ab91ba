"""SHAP explanations: additivity to the model's own log-odds, named features, and values
reported in the units a clinician reads (years, x10^9/L, CLR), for every shipped estimator."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import xgboost
from scipy.special import expit, logit
from sklearn.dummy import DummyClassifier
from sklearn.pipeline import Pipeline

from tests.helpers import cohort
from training.explain import ShapExplainer
from training.features import feature_steps
from training.model import CANDIDATES, FeatureConfig


@pytest.fixture(scope="module")
def data() -> tuple[pd.DataFrame, np.ndarray]:
    X, y, _ = cohort(50, seed=21)
    return X, y


@pytest.fixture(scope="module")
def fitted(data: tuple[pd.DataFrame, np.ndarray]) -> dict[str, Pipeline]:
    X, y = data
    return {name: c.build(FeatureConfig(), 0).fit(X, y) for name, c in CANDIDATES.items()}


@pytest.mark.parametrize("name", ["xgboost", "logistic"])
def test_shap_adds_up_to_model_log_odds(
    name: str, fitted: dict[str, Pipeline], data: tuple[pd.DataFrame, np.ndarray]
) -> None:
    """base_value + sum(shap) is the model's log-odds, so the API's numbers add up."""
    X, _ = data
    pipeline = fitted[name]
    explanation = ShapExplainer(pipeline).explain(X)
    model_log_odds = logit(pipeline.predict_proba(X)[:, 1].astype(np.float64))
    total = explanation.base_value + explanation.shap_values.sum(axis=1)
    np.testing.assert_allclose(total, model_log_odds, rtol=0, atol=1e-5)
    np.testing.assert_allclose(explanation.log_odds, total, rtol=0, atol=1e-12)
    np.testing.assert_allclose(explanation.probability, pipeline.predict_proba(X)[:, 1],
                               rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", sorted(CANDIDATES))
def test_explanation_shapes_names_and_internal_consistency(
    name: str, fitted: dict[str, Pipeline], data: tuple[pd.DataFrame, np.ndarray]
) -> None:
    """One named column per model feature; probability is expit(log_odds) in float64."""
    X, _ = data
    pipeline = fitted[name]
    explanation = ShapExplainer(pipeline).explain(X.iloc[:7])
    names = list(pipeline[:-1].get_feature_names_out())
    assert list(explanation.feature_names) == names
    assert explanation.shap_values.shape == explanation.values.shape == (7, len(names))
    assert explanation.shap_values.dtype == np.float64
    np.testing.assert_allclose(explanation.probability, expit(explanation.log_odds), atol=0)
    # a row explained alone gets the same contributions as in a batch
    alone = ShapExplainer(pipeline).explain(X.iloc[[3]])
    np.testing.assert_allclose(alone.shap_values[0], explanation.shap_values[3], atol=1e-9)


def test_xgboost_contributions_match_booster(
    fitted: dict[str, Pipeline], data: tuple[pd.DataFrame, np.ndarray]
) -> None:
    """Per-feature SHAP values are xgboost's own exact pred_contribs (path-dependent TreeSHAP)."""
    X, _ = data
    pipeline = fitted["xgboost"]
    transformed = pipeline[:-1].transform(X)
    contribs = pipeline[-1].get_booster().predict(xgboost.DMatrix(transformed),
                                                  pred_contribs=True)
    explanation = ShapExplainer(pipeline).explain(X)
    np.testing.assert_allclose(explanation.shap_values, contribs[:, :-1], rtol=0, atol=1e-6)


def test_xgboost_base_value_is_booster_bias(
    fitted: dict[str, Pipeline], data: tuple[pd.DataFrame, np.ndarray]
) -> None:
    """The reference log-odds must be the bias column of pred_contribs, not base_score alone."""
    pipeline = fitted["xgboost"]
    n_features = len(pipeline[:-1].get_feature_names_out())
    bias = pipeline[-1].get_booster().predict(
        xgboost.DMatrix(np.zeros((1, n_features))), pred_contribs=True
    )[0, -1]
    explanation = ShapExplainer(pipeline).explain(data[0].iloc[:3])
    assert explanation.base_value == pytest.approx(float(bias), abs=1e-6)


def test_logistic_values_are_in_original_units(
    fitted: dict[str, Pipeline], data: tuple[pd.DataFrame, np.ndarray]
) -> None:
    """Values undo the scaler: age reads in years and platelets in x10^9/L, not z-scores."""
    X, _ = data
    pipeline = fitted["logistic"]
    explanation = ShapExplainer(pipeline).explain(X)
    names = list(explanation.feature_names)
    for column in ("age_years", "baseline_platelets", "prior_lines"):
        known = X[column].notna().to_numpy()
        np.testing.assert_allclose(explanation.values[known, names.index(column)],
                                   X.loc[known, column], rtol=0, atol=1e-9)
    unscaled = pipeline[:-2].transform(X)  # features after imputation, before scaling
    shown = np.isfinite(explanation.values)  # imputed cells may (rightly) read as missing
    taxa = [i for i, n in enumerate(names) if n.startswith("d__")]
    assert len(taxa) > 5 and shown[:, taxa].all()  # CLR values are never missing
    np.testing.assert_allclose(explanation.values[shown], unscaled[shown], rtol=0, atol=1e-9)
    assert not np.allclose(explanation.values, pipeline[:-1].transform(X))


def test_logistic_missing_value_reads_as_missing(
    fitted: dict[str, Pipeline], data: tuple[pd.DataFrame, np.ndarray]
) -> None:
    """A value the patient never gave must not be shown as if measured."""
    X, _ = data
    missing = X["age_years"].isna().to_numpy()
    assert missing.any()
    explanation = ShapExplainer(fitted["logistic"]).explain(X)
    age = explanation.values[:, list(explanation.feature_names).index("age_years")]
    assert np.isnan(age[missing]).all()


def test_xgboost_values_keep_missing_as_nan(
    fitted: dict[str, Pipeline], data: tuple[pd.DataFrame, np.ndarray]
) -> None:
    """Without a scaler the values are the transformed features themselves, NaN included."""
    X, _ = data
    pipeline = fitted["xgboost"]
    explanation = ShapExplainer(pipeline).explain(X)
    np.testing.assert_array_equal(explanation.values, pipeline[:-1].transform(X))
    age = explanation.values[:, list(explanation.feature_names).index("age_years")]
    np.testing.assert_array_equal(np.isnan(age), X["age_years"].isna().to_numpy())


def test_unsupported_estimator_raises_type_error(data: tuple[pd.DataFrame, np.ndarray]) -> None:
    """Only estimators with an exact explainer are accepted, never a silent approximation."""
    X, y = data
    pipeline = Pipeline([*feature_steps(), ("model", DummyClassifier())]).fit(X, y)
    with pytest.raises(TypeError, match="DummyClassifier"):
        ShapExplainer(pipeline)
