"""SHAP explanations: exact additivity to the served (recalibrated) log-odds, one named input
feature per contribution, and values in the units a clinician reads, for every family."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import xgboost
from scipy.special import expit
from sklearn.dummy import DummyClassifier
from sklearn.pipeline import Pipeline

from tests.helpers import cohort
from training.explain import ShapExplainer, display_name
from training.features import feature_steps
from training.model import FAMILIES, FeatureConfig, stacked_forest
from training.plots import shap_summary_figure
from training.structure import INTERACTION
from training.tuning import ResponseModel

PARAMS = {"linear": {"design__interactions": 1.0, "design__microbiome": 1.0,
                     "model__alpha": 0.005},
          "xgboost": {"model__n_estimators": 60},
          "random_forest": {"model__n_estimators": 60}}
MODELS = [*sorted(FAMILIES), "stacked"]  # stacked: linear + forest (ModelSearch's default)


@pytest.fixture(scope="module")
def data() -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    return cohort(90, seed=21)


@pytest.fixture(scope="module")
def fitted(data: tuple[pd.DataFrame, np.ndarray, np.ndarray]) -> dict[str, ResponseModel]:
    X, y, groups = data
    models = {
        name: ResponseModel(family.build(FeatureConfig(), 0).set_params(**PARAMS[name]),
                            n_splits=3, seed=0).fit(X, y, groups)
        for name, family in FAMILIES.items()
    }
    linear = FAMILIES["linear"].build(FeatureConfig(), 0).set_params(**PARAMS["linear"])
    models["stacked"] = ResponseModel(linear, n_splits=3, seed=0,
                                      companion=stacked_forest(FeatureConfig(), "combined", 20, 0)
                                      ).fit(X, y, groups)
    assert models["stacked"].companion_ is not None  # the forest kept a weight: tested below
    return models


@pytest.mark.parametrize("name", MODELS)
def test_shap_adds_up_to_the_recalibrated_log_odds(
    name: str, fitted: dict[str, ResponseModel], data: tuple[pd.DataFrame, ...]
) -> None:
    """base_value + sum(shap) is the served log-odds exactly, recalibration included
    (to float64 for the linear model, to xgboost's float32 margin for trees)."""
    X = data[0]
    model = fitted[name]
    assert model.slope_ != pytest.approx(1.0, abs=1e-3)  # the rescaling is really exercised
    explanation = ShapExplainer(model).explain(X)
    atol = 1e-9 if name == "linear" else 1e-5  # trees: xgboost's float32 margins
    np.testing.assert_allclose(explanation.log_odds, model.decision_function(X),
                               rtol=0, atol=atol)
    np.testing.assert_allclose(explanation.probability, model.predict_proba(X)[:, 1],
                               rtol=0, atol=atol)


@pytest.mark.parametrize("name", MODELS)
def test_recalibrated_shap_is_the_weighted_sum_of_the_pipelines_shap(
    name: str, fitted: dict[str, ResponseModel], data: tuple[pd.DataFrame, ...]
) -> None:
    """Served SHAP = the weighted sum of each fitted pipeline's own (slope x the pipeline's
    alone; plus the forest's weight x its own when stacked)."""
    X = data[0].iloc[:20]
    model = fitted[name]
    served = ShapExplainer(model).explain(X)
    raw = [(ShapExplainer(pipeline).explain(X), w) for pipeline, w in model.members()]
    assert len(raw) == (2 if name == "stacked" else 1)
    np.testing.assert_allclose(served.shap_values,
                               sum(w * e.shap_values for e, w in raw), atol=1e-12)
    assert served.base_value == pytest.approx(
        model.intercept_ + sum(w * e.base_value for e, w in raw), abs=1e-12)


@pytest.mark.parametrize("name", MODELS)
def test_one_contribution_per_input_feature_and_batch_invariance(
    name: str, fitted: dict[str, ResponseModel], data: tuple[pd.DataFrame, ...]
) -> None:
    X = data[0]
    model = fitted[name]
    explanation = ShapExplainer(model).explain(X.iloc[:7])
    names = [str(n) for n in explanation.feature_names]
    assert not [n for n in names if INTERACTION in n or n.startswith("missingindicator_")]
    assert "age_years" in names and any(n.startswith("d__") for n in names)
    assert explanation.shap_values.shape == explanation.values.shape == (7, len(names))
    np.testing.assert_allclose(explanation.probability, expit(explanation.log_odds), atol=0)
    alone = ShapExplainer(model).explain(X.iloc[[3]])
    np.testing.assert_allclose(alone.shap_values[0], explanation.shap_values[3], atol=1e-9)


def test_interactions_are_summed_into_their_field(
    fitted: dict[str, ResponseModel], data: tuple[pd.DataFrame, ...]
) -> None:
    """A field's main effect and its treatment interactions are one contribution."""
    X = data[0]
    pipeline = fitted["linear"].pipeline_
    design = pipeline.named_steps["design"]
    names = list(design.get_feature_names_out())
    assert any(n.startswith(f"age_years{INTERACTION}") for n in names)
    coefficients = pipeline[-1].coef_[0]
    inputs = pipeline[:-2].transform(X)
    z = design.transform(inputs)
    columns = [i for i, n in enumerate(names) if n.split(INTERACTION)[0] == "age_years"]
    expected = (coefficients[columns] * z[:, columns]).sum(axis=1)  # zero background
    explanation = ShapExplainer(pipeline).explain(X)
    age = list(explanation.feature_names).index("age_years")
    np.testing.assert_allclose(explanation.shap_values[:, age], expected, atol=1e-9)


def test_xgboost_contributions_match_booster(
    fitted: dict[str, ResponseModel], data: tuple[pd.DataFrame, ...]
) -> None:
    """Per-feature SHAP values are xgboost's own exact pred_contribs, times the slope."""
    X = data[0]
    model = fitted["xgboost"]
    pipeline = model.pipeline_
    contribs = pipeline[-1].get_booster().predict(
        xgboost.DMatrix(pipeline[:-1].transform(X)), pred_contribs=True)
    explanation = ShapExplainer(model).explain(X)
    np.testing.assert_allclose(explanation.shap_values, model.slope_ * contribs[:, :-1],
                               rtol=0, atol=1e-6)
    assert explanation.base_value == pytest.approx(
        model.intercept_ + model.slope_ * float(contribs[0, -1]), abs=1e-6)


@pytest.mark.parametrize("name", MODELS)
def test_values_are_in_their_own_units_and_missing_stays_missing(
    name: str, fitted: dict[str, ResponseModel], data: tuple[pd.DataFrame, ...]
) -> None:
    """Age reads in years and platelets in x10^9/L (not z-scores or logs); an age the patient
    never gave is shown as missing, not as the imputed median."""
    X = data[0]
    explanation = ShapExplainer(fitted[name]).explain(X)
    names = list(explanation.feature_names)
    for column in ("age_years", "baseline_platelets", "prior_lines"):
        np.testing.assert_array_equal(explanation.values[:, names.index(column)],
                                      X[column].to_numpy(dtype=float))
    assert X["age_years"].isna().any()


def test_taxa_report_their_relative_abundance(
    fitted: dict[str, ResponseModel], data: tuple[pd.DataFrame, ...]
) -> None:
    """The share is of all the profile's reads, a genus the model never saw included."""
    X = data[0].assign(**{"d__Bacteria;p__Firmicutes;g__Novelgenus": 5000.0})
    explanation = ShapExplainer(fitted["linear"]).explain(X)
    names = list(explanation.feature_names)
    assert "d__Bacteria;p__Firmicutes;g__Novelgenus" not in names
    taxon = next(n for n in names if n.startswith("d__"))
    taxa = [c for c in X.columns if c.startswith("d__")]
    expected = X[taxon] / X[taxa].sum(axis=1)
    np.testing.assert_allclose(explanation.relative_abundance[:, names.index(taxon)], expected)
    assert np.isnan(explanation.relative_abundance[:, names.index("age_years")]).all()
    assert display_name(taxon) == f"{taxon.rsplit('g__', 1)[1]} (genus)"


def test_every_non_taxon_feature_has_a_clinical_name(fitted: dict[str, ResponseModel],
                                                     data: tuple[pd.DataFrame, ...]) -> None:
    """A clinician reads "Thrombopoietin (TPO)" and "Treatment: IVIG", not tpo_pg_ml and
    treatment=ivig: a feature the encoder adds without a label fails here."""
    names = [str(n) for n in ShapExplainer(fitted["stacked"]).input_names]
    clinical = [n for n in names if not n.startswith("d__")]
    assert {"tpo_pg_ml", "treatment=ivig", "sex=male", "bleeding_severity"} <= set(clinical)
    assert not [n for n in clinical if display_name(n) == n]
    assert display_name("tpo_pg_ml") == "Thrombopoietin (TPO)"
    assert display_name("treatment=tpo_ra") == "Treatment: TPO receptor agonist"
    assert display_name("phase=newly_diagnosed") == "ITP phase: newly diagnosed"
    # the summary plot colours by value, so its labels carry the unit
    explanation = ShapExplainer(fitted["stacked"]).explain(data[0])
    figure = shap_summary_figure(explanation, max_display=len(names))
    ticks = [t.get_text() for t in figure.axes[0].get_yticklabels()]
    plt.close(figure)
    assert "Thrombopoietin (TPO), pg/mL" in ticks and "Treatment: IVIG" in ticks
    assert any(t.endswith("(genus), CLR") for t in ticks)


def test_unsupported_estimator_raises_type_error(data: tuple[pd.DataFrame, ...]) -> None:
    """Only estimators with an exact explainer are accepted, never a silent approximation."""
    X, y, _ = data
    pipeline = Pipeline([*feature_steps(), ("model", DummyClassifier())]).fit(X, y)
    with pytest.raises(TypeError, match="DummyClassifier"):
        ShapExplainer(pipeline)
