"""The linear model's structure: treatment indicators and the intercept stratify rather than
compete for the penalty, and the one-standard-error rule never trades a penalty kind for
another."""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.pipeline import make_pipeline

from tests.helpers import cohort
from training.model import FAMILIES, FEATURE_STEPS, FeatureConfig, _linear
from training.structure import LinearDesign, PenalisedLogistic
from training.tuning import ModelSearch

RATES = {"treatment=corticosteroid": 0.85, "treatment=rituximab": 0.35}


def _two_treatments(n: int = 400, seed: int = 0) -> tuple[pd.DataFrame, np.ndarray]:
    """Response depends on the treatment only; ten lab values are noise."""
    rng = np.random.default_rng(seed)
    steroid = rng.random(n) < 0.5
    X = pd.DataFrame({"treatment=corticosteroid": steroid.astype(float),
                      "treatment=rituximab": (~steroid).astype(float),
                      **{f"noise_{i}": rng.normal(size=n) for i in range(10)}})
    rate = np.where(steroid, *RATES.values())
    return X, (rng.random(n) < rate).astype(int)


def _rate_error(treatment_weight: float, intercept_scaling: float = 100.0) -> float:
    X, y = _two_treatments()
    model = make_pipeline(LinearDesign(treatment=treatment_weight),  # the heaviest lasso:
                          PenalisedLogistic(alpha=0.06, intercept_scaling=intercept_scaling)
                          ).fit(X, y)
    p = model.predict_proba(X)[:, 1]
    return max(abs(p[X[t] == 1].mean() - y[X[t] == 1].mean()) for t in RATES)


def test_treatment_indicators_keep_each_treatments_response_rate_under_a_heavy_penalty() -> None:
    assert LinearDesign().treatment == 10.0
    assert _rate_error(10.0) < 0.03
    assert _rate_error(1.0) > 0.05  # penalised like a marker, they shrink to the pooled rate
    assert _rate_error(10.0, intercept_scaling=1.0) > 0.05  # liblinear's penalised intercept


def test_the_linear_search_offers_its_penalties_for_every_feature_set() -> None:
    """Lasso and ridge in both presets; thorough adds the elastic net between them."""
    for preset, mixes in (("fast", (1.0, 0.0)), ("thorough", (1.0, 0.0, 0.5))):
        regions = {(grid["blocks__blocks"][0], grid["model__l1_ratio"][0])
                   for grid in FAMILIES["linear"].space(preset)}
        assert regions == {(s, r) for s in ("clinical", "microbiome", "combined")
                           for r in mixes}
    assert {FAMILIES["linear"].region({"model__l1_ratio": r}) for r in (1.0, 0.0, 0.5)} == {
        "lasso", "ridge", "elastic-net"}


def test_an_elastic_net_keeps_more_than_the_lasso_and_less_than_the_ridge() -> None:
    """A mixed penalty is really fitted as one (saga), between its two ends in sparsity."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((300, 40))
    y = (X[:, :6].sum(axis=1) + rng.logistic(size=300) > 0).astype(int)
    kept = {mix: int((PenalisedLogistic(alpha=0.05, l1_ratio=mix, random_state=0)
                      .fit(X, y).coef_ != 0).sum()) for mix in (1.0, 0.5, 0.0)}
    assert kept[1.0] < kept[0.5] < kept[0.0] == 40
    assert PenalisedLogistic(l1_ratio=0.5).fit(X, y).solver == "saga"


def test_one_standard_error_rule_stays_within_the_best_penalty_kind() -> None:
    """A ridge within one SE of the best lasso looks simpler by alpha, but alphas of the two
    penalties are not on one scale: the rule must stay with the lasso."""
    linear = FAMILIES["linear"]
    rows = [({"model__l1_ratio": 1.0, "model__alpha": 0.02}, 0.80),
            ({"model__l1_ratio": 1.0, "model__alpha": 0.06}, 0.70),
            ({"model__l1_ratio": 0.0, "model__alpha": 1.0}, 0.78)]
    search = ModelSearch(inner_splits=3)
    search.results_ = pd.DataFrame([
        {"family": "linear", "feature_set": "combined", "rank": "genus", "params": params,
         "inner_score": score, "inner_score_sd": 0.05,
         "complexity": linear.complexity(params), "region": linear.region(params)}
        for params, score in rows])
    assert search.best_of()["params"] == rows[0][0]
    search.results_["region"] = ""  # without regions the ridge would win on "complexity"
    assert search.best_of()["params"] == rows[2][0]


def test_the_search_form_scores_what_the_served_pipeline_computes() -> None:
    """The inner search fits the design once and weights its columns per configuration: for
    every feature set and weighting that must be the served pipeline's design exactly."""
    X, y, _ = cohort(90, seed=3)  # with missing values and treatments of >= 25 episodes
    config = FeatureConfig(missing_indicators=True)
    features = FAMILIES["linear"].build(config, 0)[:FEATURE_STEPS].fit_transform(X, y)
    form = FAMILIES["linear"].searched(config, 0)
    prepared = form.prepare.fit_transform(features)
    assert any("|" in c for c in prepared.columns)
    assert any(c.startswith("missingindicator_") for c in prepared.columns)
    for grid in FAMILIES["linear"].space("fast"):
        params = {k: v[-1] for k, v in grid.items() if not k.startswith("model__")}
        served = _linear(config, 0)[FEATURE_STEPS:-1].set_params(**params)
        searched = form.head[:-1].set_params(**{form.rename[k]: v for k, v in params.items()})
        expected = served.fit_transform(features)
        assert list(searched.fit(prepared).get_feature_names_out()) == list(
            served.get_feature_names_out())
        np.testing.assert_allclose(searched.transform(prepared), expected, atol=1e-12)
        assert expected.shape[1] < prepared.shape[1] or params["blocks__blocks"] == "combined"
