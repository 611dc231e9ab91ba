"""The service's compiled scoring path equals the scikit-learn pipeline it was compiled from,
for every model family, on simulator cohorts (probabilities to 1e-9; SHAP values to 1e-9 for
the linear family, to float32 precision for XGBoost's trees)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy.special import logit

from service.model import inputs
from service.payloads import patient_payloads
from service.schemas import Patient
from service.scoring import CompiledModel
from training.cohort import load_cohort
from training.explain import ShapExplainer
from training.model import FAMILIES, FeatureConfig, stacked_forest
from training.outcomes import response_labels, target
from training.simulate import SCENARIOS, simulate, write_cohort
from training.tuning import ResponseModel

VARIANTS = {  # family, feature config, pipeline parameters (stacked: with the forest)
    "linear": ("linear", FeatureConfig(), {"design__interactions": 0.5,
                                           "design__microbiome": 0.5, "model__alpha": 0.01}),
    "linear, species, indicators": ("linear", FeatureConfig(rank="species",
                                                            missing_indicators=True),
                                    {"model__alpha": 0.01}),
    "linear, clinical only": ("linear", FeatureConfig(), {"blocks__blocks": "clinical"}),
    "xgboost": ("xgboost", FeatureConfig(), {}),
    "random_forest": ("random_forest", FeatureConfig(), {"blocks__blocks": "combined"}),
    "linear + stacked forest": ("linear", FeatureConfig(), {"model__alpha": 0.01}),
    "linear + stacked forest, clinical only": ("linear", FeatureConfig(),
                                               {"blocks__blocks": "clinical"}),
    "linear + stacked forest, genus and species": ("linear", FeatureConfig(rank="both"),
                                                   {"model__alpha": 0.01}),
}


_NOVEL_SPECIES = ("d__Bacteria;p__Firmicutes;c__Clostridia;o__Lachnospirales;"
                  "f__Lachnospiraceae;g__Blautia;s__Blautia_novus")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    directory: Path = tmp_path_factory.mktemp("scoring")
    write_cohort(simulate(160, 11, SCENARIOS["default"]), directory)
    loaded = load_cohort(directory)
    y = target(response_labels(loaded.metadata)).to_numpy()
    payloads = patient_payloads(loaded.metadata, loaded.counts)
    # patients the model has never seen, some with genera it does not know
    for i, payload in enumerate(payloads[:40]):
        if i % 3 == 0:
            payload["microbiome"]["counts"]["d__Bacteria;p__Firmicutes;g__Novelgenus"] = 500.0
        if i % 4 == 0:  # a species the model never saw, of a genus it knows
            payload["microbiome"]["counts"][_NOVEL_SPECIES] = 300.0
    patients = [Patient.model_validate(p) for p in payloads[:60]]
    return {"loaded": loaded, "y": y, "patients": patients}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_compiled_scoring_equals_the_pipeline(cohort: dict[str, object], variant: str) -> None:
    family, config, params = VARIANTS[variant]
    loaded = cohort["loaded"]
    X_train = inputs([Patient.model_validate(p) for p in patient_payloads(
        loaded.metadata, loaded.counts)])
    pipeline = FAMILIES[family].build(config, 3).set_params(**params)
    companion = (stacked_forest(config, pipeline.get_params()["blocks__blocks"], 30, 3)
                 if "stacked" in variant else None)
    model = ResponseModel(pipeline, n_splits=3, seed=3, companion=companion).fit(
        X_train, cohort["y"], loaded.groups.to_numpy())
    assert (model.companion_ is not None) == ("stacked" in variant)
    patients = cohort["patients"]
    X = inputs(patients)

    scored = CompiledModel(model).score(patients)
    expected = ShapExplainer(model).explain(X)
    np.testing.assert_allclose(scored.probability, model.predict_proba(X)[:, 1],
                               rtol=0, atol=1e-9)
    got = scored.explanation
    assert list(got.feature_names) == list(expected.feature_names)
    np.testing.assert_allclose(got.values, expected.values, rtol=0, atol=1e-9)
    np.testing.assert_allclose(got.relative_abundance, expected.relative_abundance,
                               rtol=0, atol=1e-12)
    shap_tolerance = 1e-9 if variant.startswith("linear") and "stacked" not in variant \
        else 1e-5  # trees: float32 arithmetic
    np.testing.assert_allclose(got.shap_values, expected.shap_values, rtol=0,
                               atol=shap_tolerance)
    assert got.base_value == pytest.approx(expected.base_value, abs=shap_tolerance)
    np.testing.assert_allclose(got.log_odds, logit(scored.probability), rtol=0,
                               atol=shap_tolerance)  # base + contributions = log-odds
    aligner = model.pipeline_.named_steps["align"]
    np.testing.assert_allclose(scored.taxa_matched, aligner.matched_share(X), atol=1e-12)
    for patient, unknown in zip(patients, scored.unknown, strict=True):
        assert unknown == pytest.approx(aligner.unknown_taxa(patient.microbiome.counts))
    assert any(scored.unknown)

    alone = CompiledModel(model).score(patients[:1], explain=False)
    assert alone.probability[0] == pytest.approx(scored.probability[0], abs=1e-12)


def test_a_model_registered_before_stacking_still_scores(cohort: dict[str, object]) -> None:
    """A ResponseModel saved before the stacked forest existed has no `companion_` or
    `companion_slope_`: it loads, compiles and scores as its one pipeline."""
    loaded = cohort["loaded"]
    X_train = inputs([Patient.model_validate(p) for p in patient_payloads(
        loaded.metadata, loaded.counts)])
    model = ResponseModel(FAMILIES["linear"].build(FeatureConfig(), 3), n_splits=3, seed=3
                          ).fit(X_train, cohort["y"], loaded.groups.to_numpy())
    del model.__dict__["companion_"], model.__dict__["companion_slope_"]
    X = inputs(cohort["patients"])
    expected = model.intercept_ + model.slope_ * model.pipeline_.decision_function(X)
    np.testing.assert_allclose(logit(CompiledModel(model).score(cohort["patients"]).probability),
                               expected, rtol=0, atol=1e-9)
    assert not model.flat
