"""Nested cross-validation and the model search: nothing fitted or chosen ever sees the outer
test fold, patients never straddle folds, permuted labels score as chance, and the
recalibrated model is what the search serves."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import pandas as pd
import pytest
from scipy.special import expit, logit
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import Pipeline

from tests.helpers import cohort
from training import evaluation
from training import model as model_module
from training import tuning as tuning_module
from training.evaluation import (
    CVConfig,
    grouped_splits,
    nested_cross_validate,
    permutation_control,
)
from training.features import TaxonomyAligner
from training.folds import TreatmentStratifiedGroupKFold
from training.model import FAMILIES, Family, FeatureBlocks, FeatureConfig, SearchForm
from training.schema import is_taxon
from training.structure import BlockWeights, LinearDesign
from training.tuning import (
    ModelSearch,
    ResponseModel,
    out_of_fold_log_odds,
    recalibration,
    youden_threshold,
)


class Spy:
    """Records the sample ids every spied step is fitted on and transforms."""

    events: ClassVar[list[tuple[str, frozenset[str]]]] = []
    tagged: ClassVar[list[str]] = []  # fits of tagged spies (the stacked forest's)

    @classmethod
    def record(cls, kind: str, X: pd.DataFrame) -> None:
        cls.events.append((kind, frozenset(map(str, X.index))))


class SpyAligner(TaxonomyAligner):
    def __init__(self, rank: str = "genus", tag: str = "") -> None:
        super().__init__(rank)
        self.tag = tag

    def fit(self, X: pd.DataFrame, y: object = None) -> SpyAligner:
        Spy.record("fit", X)
        if self.tag:
            Spy.tagged.append(self.tag)
        return super().fit(X, y)

    def transform(self, X: pd.DataFrame) -> pd.DataFrame:
        Spy.record("transform", X)
        return super().transform(X)


class SpyDesign(LinearDesign):
    def fit(self, X: pd.DataFrame, y: object = None) -> SpyDesign:
        Spy.record("fit", X)
        return super().fit(X, y)

    def transform(self, X: pd.DataFrame) -> np.ndarray:
        Spy.record("transform", X)
        return super().transform(X)


class SpyWeights(BlockWeights):
    def fit(self, X: pd.DataFrame, y: object = None) -> SpyWeights:
        Spy.record("fit", X)
        return super().fit(X, y)

    def transform(self, X: pd.DataFrame) -> np.ndarray:
        Spy.record("transform", X)
        return super().transform(X)


def _spied_linear(config: FeatureConfig, seed: int) -> Pipeline:
    pipeline = model_module._linear(config, seed)
    steps = dict(pipeline.steps)
    steps["align"] = SpyAligner(config.rank)
    steps["design"] = SpyDesign()
    return Pipeline(list(steps.items()))


def _spied_forest(config: FeatureConfig, blocks: str, n_features: int, seed: int
                  ) -> Pipeline:
    """The shipped stacked forest, its taxonomy step spied on (tagged, to count it)."""
    pipeline = model_module.stacked_forest(config, blocks, n_features, seed)
    steps = dict(pipeline.steps)
    steps["align"] = SpyAligner(config.rank, tag="forest")
    return Pipeline(list(steps.items()))


def _spied_linear_search(config: FeatureConfig, seed: int) -> SearchForm:
    """The shipped search form of the linear family, its design and weights spied on."""
    form = model_module._linear_search(config, seed)
    design = SpyDesign(**form.prepare.get_params()).set_output(transform="pandas")
    head = Pipeline([("weights", SpyWeights()), *form.head.steps[1:]])
    return SearchForm(head=head, prepare=design, rename=form.rename)


@pytest.fixture
def spied(monkeypatch: pytest.MonkeyPatch) -> str:
    linear = FAMILIES["linear"]
    monkeypatch.setitem(FAMILIES, "spied", Family(
        "spied", "linear with spies", _spied_linear, linear.space, linear.n_iter,
        linear.complexity, linear.region, _spied_linear_search))
    monkeypatch.setattr(tuning_module, "stacked_forest", _spied_forest)
    Spy.events.clear()
    Spy.tagged.clear()
    return "spied"


def _violations(events: list[tuple[str, frozenset[str]]], folds: list[tuple[set, set]]
                ) -> list[tuple[str, int]]:
    """Events that fit on, or transform, outer-test samples in any way other than the outer
    fold's own final prediction (a transform of exactly that fold's test set)."""
    bad = []
    for kind, ids in events:
        inside_a_training_fold = any(ids <= train for train, _ in folds)
        outer_prediction = kind == "transform" and any(ids == test for _, test in folds)
        if not (inside_a_training_fold or outer_prediction):
            bad.append((kind, len(ids)))
    return bad


def test_nothing_fitted_or_chosen_sees_the_outer_test_fold(spied: str) -> None:
    X, y, groups = cohort(60, seed=5)
    config = CVConfig(n_splits=3, n_repeats=1, n_bootstrap=100, seed=1)
    nested_cross_validate(ModelSearch(families=(spied,), inner_splits=3, seed=1), X, y, groups,
                          config, regions=False)
    folds = [({str(i) for i in X.index[train]}, {str(i) for i in X.index[test]})
             for _, train, test in grouped_splits(y, groups, config, X)]
    fits = [ids for kind, ids in Spy.events if kind == "fit"]
    assert len(fits) > 3 * 20  # the inner search really ran through the spies
    # and so did the forest stacked in each outer fold (5 recalibration folds, + final if kept)
    assert len(Spy.tagged) >= 3 * 5
    assert _violations(Spy.events, folds) == []
    # control: choosing on all data (the leak nesting prevents) is caught by the same check
    Spy.events.clear()
    ModelSearch(families=(spied,), inner_splits=3, seed=1).fit(X, y, groups)
    assert _violations(Spy.events, folds)


def test_nothing_fitted_or_chosen_depends_on_the_outer_test_labels(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The spy test's other half: flip the labels of one outer fold's test patients, and
    everything that fold's procedure chose and fitted (champion configuration, recalibration,
    stacking weight, threshold, every region's refit, its predictions) stays bit for bit the
    same. A selection that scored candidates on the outer test fold would follow the flip."""
    X, y, groups = cohort(60, seed=5)
    config = CVConfig(n_splits=3, n_repeats=1, n_bootstrap=50, seed=1)
    splits = list(grouped_splits(y, groups, config, X))  # fixed: flipped labels move no fold
    monkeypatch.setattr(evaluation, "grouped_splits", lambda *args, **kwargs: iter(splits))
    _, train, test = splits[0]
    flipped = y.copy()
    flipped[test] = 1 - flipped[test]
    search = ModelSearch(families=("linear", "xgboost"), seed=1)
    runs = [nested_cross_validate(search, X, labels, groups, config) for labels in (y, flipped)]

    assert set(runs[0].results) == set(runs[1].results) and len(runs[0].results) >= 4
    for key in runs[0].results:
        np.testing.assert_array_equal(runs[0].results[key].oof[0, test],
                                      runs[1].results[key].oof[0, test], err_msg=key)
    chosen = [{k: v for k, v in vars(run.folds[0]).items() if k != "importance"}
              for run in runs]
    assert chosen[0] == chosen[1]
    pd.testing.assert_series_equal(runs[0].folds[0].importance, runs[1].folds[0].importance)
    # control: the folds that trained on the flipped patients did change
    assert not np.array_equal(runs[0].champion.oof[0, train], runs[1].champion.oof[0, train])
    # control: choosing the fold's champion among the regions by its outer test AUROC (the
    # winner's curse) does follow the flip, so the equalities above can fail for a leak
    regions = [key for key in runs[0].results if key != "champion"]

    def leaky_choice(labels: np.ndarray) -> str:
        return max(regions, key=lambda key: roc_auc_score(
            labels[test], runs[0].results[key].oof[0, test]))

    assert leaky_choice(y) != leaky_choice(flipped)


def test_patients_never_straddle_inner_or_outer_folds(spied: str) -> None:
    """Every fit during nested CV holds either all or none of a patient's episodes."""
    X, y, groups = cohort(60, seed=6)
    patient = dict(zip(map(str, X.index), groups, strict=True))
    episodes = pd.Series(groups).value_counts()
    nested_cross_validate(ModelSearch(families=(spied,), seed=2), X, y, groups,
                          CVConfig(n_splits=3, n_bootstrap=100, seed=2), regions=False)
    for kind, ids in Spy.events:
        if kind == "fit":
            counts = pd.Series([patient[i] for i in ids]).value_counts()
            assert (counts == episodes[counts.index]).all()


def test_permuted_labels_score_chance_through_the_nested_procedure() -> None:
    """With a strong real signal, the same procedure on labels permuted by patient is ~0.5."""
    X, y, groups = cohort(80, seed=7)
    search = ModelSearch(seed=3)
    config = CVConfig(n_splits=4, n_bootstrap=100, seed=3)
    real = nested_cross_validate(search, X, y, groups, config, regions=False)
    assert real.champion.summary["auroc_mean"] > 0.8
    permuted = permutation_control(search, X, y, groups, config, n_permutations=5)
    assert len(permuted) == 5
    assert abs(np.mean(permuted) - 0.5) < 0.1, permuted


def test_nested_result_scores_every_feature_set_and_family_on_the_same_folds() -> None:
    X, y, groups = cohort(70, seed=8)
    result = nested_cross_validate(ModelSearch(families=("linear", "xgboost"), seed=4), X, y,
                                   groups, CVConfig(n_splits=3, n_bootstrap=100, seed=4))
    assert {"champion", "set:clinical", "set:microbiome", "set:combined", "family:linear",
            "family:xgboost"} <= set(result.results)
    # the label follows one genus: the microbiome sets must beat clinical-only
    assert result.results["set:microbiome"].summary["auroc_mean"] > 0.75
    gain = result.comparisons["combined-vs-clinical"]
    assert gain["auroc_difference"] > 0.1 and gain["ci_low"] > 0
    assert len(result.folds) == 3 and all(not f.importance.empty for f in result.folds)
    champion = result.champion.summary
    assert "calibration_slope_ci_low" in champion and "calibration_in_the_large_ci_high" in champion


def test_search_serves_a_recalibrated_model_of_its_best_configuration() -> None:
    X, y, groups = cohort(60, seed=9)
    search = ModelSearch(seed=5).fit(X, y, groups)
    assert isinstance(search.model_, ResponseModel)
    best = search.results_.loc[search.results_["inner_score"].idxmax()]
    assert search.best_["params"] == best["params"]
    params = search.model_.pipeline_.get_params()
    assert all(params[k] == v for k, v in best["params"].items())
    assert search.model_.pipeline_.memory is None
    np.testing.assert_allclose(search.predict_proba(X), search.model_.predict_proba(X))
    assert 0 < search.model_.threshold_ < 1
    # a genus-level table: species and both would give the same features, so are not searched
    assert set(search.results_["rank"]) == {"genus"}


def test_search_chooses_among_ranks_that_give_different_features() -> None:
    """With species-level reads, genus, species and both are distinct choices, each scored
    on the inner folds; the served model has the chosen rank."""
    X, y, groups = cohort(60, seed=9)
    X = X.rename(columns=lambda c: f"{c};s__{c.rsplit('__', 1)[1]}_{len(c) % 2}"
                 if is_taxon(c) and c.endswith(("1", "3", "5")) else c)
    search = ModelSearch(seed=5, ranks=("genus", "species", "both"), stack=False).fit(
        X, y, groups)
    assert set(search.results_["rank"]) == {"genus", "species", "both"}
    assert search.model_.pipeline_.named_steps["align"].rank == search.best_["rank"]


def test_a_searched_rank_sets_the_pipeline_structure_not_only_the_aligner() -> None:
    """`both` chosen by the search (not by FeatureConfig) serves, and stacks, genus and
    species as two compositions: each closed and CLR-transformed on its own."""
    X, y, groups = cohort(60, seed=9)
    X = X.rename(columns=lambda c: f"{c};s__{c.rsplit('__', 1)[1]}_{len(c) % 2}"
                 if is_taxon(c) and c.endswith(("1", "3", "5")) else c)
    search = ModelSearch(seed=5, ranks=("both",), features=FeatureConfig(rank="genus")).fit(
        X, y, groups)
    members = [m for m, _ in search.model_.members()] + [
        search.refit_best(X, y, features="microbiome")]
    for pipeline in members:
        features = pipeline[:2].transform(X)
        species = [c for c in features.columns if ";s__" in c]
        assert species and "taxa_species" in pipeline.named_steps[
            "features"].named_transformers_
        np.testing.assert_allclose(features[species].sum(axis=1), 0.0, atol=1e-9)


def test_recalibration_never_inverts_a_ranking_and_flags_a_flat_model() -> None:
    """Predictions that rank backwards out of fold collapse to the base rate (slope 0,
    flagged), never to an inverted model; honest predictions keep a positive slope."""
    rng = np.random.default_rng(0)
    p = rng.uniform(0.05, 0.95, 2000)
    y = (rng.random(p.size) < p).astype(int)
    intercept, slopes = recalibration(y, -logit(p))
    assert slopes.tolist() == [0.0] and intercept == pytest.approx(logit(y.mean()))
    intercept, slopes = recalibration(y, logit(p))
    assert slopes[0] == pytest.approx(1.0, abs=0.15) and intercept == pytest.approx(0.0, abs=0.15)
    X, labels, groups = cohort(60, seed=10)
    model = ResponseModel(FAMILIES["linear"].build(FeatureConfig(), 0), seed=0).fit(
        X, labels, groups)
    assert not model.flat
    model.slope_ = 0.0
    assert model.flat and np.ptp(model.predict_proba(X)[:, 1]) == 0.0


def test_the_threshold_is_chosen_on_out_of_fold_predictions() -> None:
    """Youden's cut-off on the recalibrated out-of-fold probabilities, not on the refitted
    model's own training predictions (which rank its training patients too well)."""
    X, y, groups = cohort(80, seed=12)
    pipeline = FAMILIES["xgboost"].build(FeatureConfig(), 0)
    model = ResponseModel(pipeline, seed=0).fit(X, y, groups)
    splits = list(TreatmentStratifiedGroupKFold(5, shuffle=True, random_state=0).split(
        X, y, groups))
    oof = out_of_fold_log_odds(pipeline, X, y, splits)
    assert model.threshold_ == youden_threshold(y, expit(model.intercept_ + model.slope_ * oof))
    assert model.threshold_ != youden_threshold(y, model.predict_proba(X)[:, 1])
    assert ResponseModel(pipeline, seed=0, threshold=0.3).fit(X, y, groups).threshold_ == 0.3


def test_stacking_weights_each_model_by_what_it_adds_out_of_fold() -> None:
    """Two models that each carry part of the signal both get a positive weight; a model
    that adds nothing given the other gets (about) 0, and one that ranks backwards given the
    other gets exactly 0 rather than a negative weight."""
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(2, 4000))
    y = (rng.random(a.size) < expit(a + b)).astype(int)
    _, slopes = recalibration(y, np.column_stack([a, b]))
    assert slopes == pytest.approx([1.0, 1.0], abs=0.15)
    _, slopes = recalibration(y, np.column_stack([a + b, -b]))
    assert slopes[0] > 0.8 and slopes[1] == pytest.approx(0.0, abs=0.1)
    _, slopes = recalibration(y, np.column_stack([a + b, -a - b + 0.1 * rng.normal(size=a.size)]))
    assert slopes[0] > 0.8 and slopes[1] == 0.0


def test_feature_blocks_keep_treatment_in_every_set() -> None:
    X, y, _ = cohort(30, seed=11)
    features = FAMILIES["linear"].build(FeatureConfig(), 0)[:2].fit_transform(X, y)
    kept = {s: list(FeatureBlocks(s).fit(features).get_feature_names_out())
            for s in ("clinical", "microbiome", "combined")}
    assert any(c.startswith("treatment=") for c in kept["clinical"])
    assert any(c.startswith("treatment=") for c in kept["microbiome"])
    assert not any(c.startswith("d__") for c in kept["clinical"])
    assert "age_years" not in kept["microbiome"] and "shannon_diversity" in kept["microbiome"]
    assert set(kept["clinical"]) | set(kept["microbiome"]) == set(kept["combined"])
