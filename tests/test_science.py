"""The science against the simulator's truth: a real microbiome signal is found (and missing
it fails the test), effective features outrank no-effect ones in the explanations, every
scenario of the simulator generates, and the oracle is what it claims to be."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from training.cohort import load_cohort
from training.confounders import confounder_report, confounder_warnings
from training.explain import ShapExplainer
from training.features import lineage_at_rank, model_input
from training.outcomes import response_labels, target
from training.simulate import (
    SCENARIOS,
    load_genera,
    oracle_design,
    oracle_model,
    simulate,
    write_cohort,
)
from training.tuning import ModelSearch

# few_strong_taxa at twice its effect sizes: the truth says the microbiome matters a lot
STRONG = replace(SCENARIOS["few_strong_taxa"], name="strong_taxa", signal=2.0)
EFFECTIVE_TAXA = ("Faecalibacterium", "Bacteroides", "Streptococcus")


def _load(cohort: object, directory: Path) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    write_cohort(cohort, directory)
    loaded = load_cohort(directory)
    y = target(response_labels(loaded.metadata)).to_numpy()
    return model_input(loaded.metadata, loaded.counts), y, loaded.groups.to_numpy()


@pytest.fixture(scope="module")
def strong(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """The product's model search fitted on one draw, scored on an independent draw, next to
    an oracle fitted on the same training draw."""
    tmp = tmp_path_factory.mktemp("science")
    train, test = simulate(400, 21, STRONG), simulate(400, 1021, STRONG)
    X, y, groups = _load(train, tmp / "train")
    Xt, yt, _ = _load(test, tmp / "test")
    search = ModelSearch(seed=21).fit(X, y, groups)
    oracle = {}
    for microbiome in (True, False):
        terms = oracle_design(train.metadata, train.feature_table, STRONG, microbiome)
        model = oracle_model().fit(terms, y)
        test_terms = oracle_design(test.metadata, test.feature_table, STRONG, microbiome)
        oracle[microbiome] = roc_auc_score(yt, model.predict_proba(
            test_terms.reindex(columns=terms.columns, fill_value=0.0))[:, 1])
    clinical = search.refit_best(X, y, features="clinical")
    return {"X": X, "search": search, "oracle": oracle,
            "auroc": roc_auc_score(yt, search.predict_proba(Xt)[:, 1]),
            "clinical_auroc": roc_auc_score(yt, clinical.predict_proba(Xt)[:, 1])}


def test_the_microbiome_signal_is_captured(strong: dict[str, object]) -> None:
    """Combined minus clinical-only AUROC on an independent draw is at least half of what
    the correctly specified model gains from the microbiome; a model that ignores taxa
    (or drowns them) gains nothing and fails."""
    oracle = strong["oracle"]
    oracle_gain = oracle[True] - oracle[False]
    assert oracle_gain > 0.05  # the scenario really carries microbiome signal
    gain = strong["auroc"] - strong["clinical_auroc"]
    assert strong["search"].best_["feature_set"] == "combined"
    assert gain >= 0.5 * oracle_gain, (gain, oracle_gain)
    assert oracle[True] - strong["auroc"] < 0.08  # and not far from the oracle overall


def test_effective_features_outrank_no_effect_ones(strong: dict[str, object]) -> None:
    """In the global SHAP ranking (per genus), the taxon with the largest true effect leads
    the taxa, and the effective taxa get several times the attribution of taxa with no effect
    (taxa not tied to the immune state, so without even an indirect effect)."""
    importance = ShapExplainer(strong["search"].model_).explain(strong["X"]).mean_abs()
    genera = load_genera().set_index("lineage")
    taxa = importance[[str(n).startswith("d__") for n in importance.index]]
    # The search may choose species features: a genus's attribution is the sum of its species'.
    taxa = taxa.groupby(taxa.index.map(lambda n: lineage_at_rank(str(n), "genus"))).sum()
    taxa = taxa.sort_values(ascending=False)
    genus = taxa.index.map(lambda n: str(n).rsplit("g__", 1)[-1])
    role = taxa.index.map(lambda n: genera["role"].get(n, "other"))
    effective = taxa[genus.isin(EFFECTIVE_TAXA)]
    no_effect = taxa[~genus.isin(EFFECTIVE_TAXA) & (role == "other")]
    assert genus[0] == "Faecalibacterium", taxa.head()
    assert len(no_effect) > 30
    assert effective.mean() > 5 * no_effect.mean(), (effective, no_effect.describe())


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_every_scenario_generates_a_cohort_the_loader_accepts(name: str, tmp_path: Path
                                                              ) -> None:
    cohort = simulate(60, 5, SCENARIOS[name])
    X, y, _ = _load(cohort, tmp_path / name)
    assert len(X) == len(y) == len(cohort.truth)
    assert 0 < y.mean() < 1


def test_oracle_terms_follow_the_truth_where_nothing_is_missing() -> None:
    """On complete cells the oracle's design reproduces the true logit up to the read
    sampling of microbiome terms: a logistic fit on it recovers the true coefficients."""
    scenario = replace(SCENARIOS["default"], clinical_missing={}, immune_missing=0.0)
    cohort = simulate(3000, 8, scenario)
    terms = oracle_design(cohort.metadata, cohort.feature_table, scenario)
    y = cohort.truth["responded"].to_numpy()
    model = oracle_model().fit(terms, y)
    coefficients = pd.Series(model[-1].coef_[0], index=terms.columns)
    truth = {c["name"]: c["beta"] for c in cohort.info["coefficients"]}
    for name in ("anti_gpib:ivig", "std_log_baff_pg_ml:all", "log2_ipf:corticosteroid"):
        assert coefficients[name] == pytest.approx(truth[name], abs=0.35), name
    p = model.predict_proba(terms)[:, 1]
    assert roc_auc_score(y, p) > cohort.info["best_auroc"] - 0.03


def test_confounder_report_flags_a_batch_that_tracks_the_label(tmp_path: Path) -> None:
    cohort = simulate(300, 9, SCENARIOS["default"])
    _, y, _ = _load(cohort, tmp_path / "c")
    loaded = load_cohort(tmp_path / "c")
    metadata = loaded.metadata.assign(batch=np.where(y == 1, "run_A", "run_B"))
    flip = np.random.default_rng(0).random(len(y)) < 0.2
    metadata.loc[flip, "batch"] = "run_C"
    report = confounder_report(metadata, loaded.counts, y).set_index("variable")
    assert report.loc["batch", "flagged"] and report.loc["batch", "q_value"] < 1e-6
    assert not report.loc["baseline_platelets", "flagged"]  # "plate" inside a word
    assert report.loc["read_depth", "flagged"]
    assert report.loc["antibiotics_3m", "flagged"]  # a known confounder, whatever its p
    assert report.loc["age_years", "effect"] == "Cliff's delta"
    warnings = confounder_warnings(report.reset_index())
    assert any(w.startswith("batch is associated with the label") for w in warnings)
    honest = confounder_report(loaded.metadata, loaded.counts, y)
    assert not any(w.startswith("batch") for w in confounder_warnings(honest))
