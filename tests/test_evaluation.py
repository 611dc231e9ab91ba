"""Cross-validation: subject grouping, metric equivalence with scikit-learn, the patient
bootstrap, calibration, and end-to-end sanity (shuffled labels ~ chance, real signal high)."""

from __future__ import annotations

import warnings
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
from scipy.special import expit, logit
from sklearn.metrics import average_precision_score, brier_score_loss, roc_auc_score

from tests.helpers import cohort
from training.evaluation import (
    CVConfig,
    bootstrap,
    calibration,
    check_cohort_size,
    cross_validate,
    fast_metrics,
    grouped_splits,
    net_benefit,
    paired_difference,
    permuted_by_patient,
    shap_stability,
    summarise,
)
from training.model import FAMILIES, FeatureConfig
from training.plots import roc_figure


def _grouped_labels(n_subjects: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """1-3 episodes per subject, labels varying within subjects."""
    rng = np.random.default_rng(seed)
    groups = np.repeat(np.arange(n_subjects), rng.integers(1, 4, size=n_subjects))
    return (rng.random(len(groups)) < 0.4).astype(int), groups


def test_grouped_splits_keep_subjects_together_every_repeat() -> None:
    """A patient's episodes never sit on both sides of a split (leakage via the subject)."""
    y, groups = _grouped_labels(40, seed=1)
    config = CVConfig(n_splits=5, n_repeats=3, seed=3)
    folds: dict[int, np.ndarray] = {r: np.full(len(y), -1) for r in range(config.n_repeats)}
    for repeat, train, test in grouped_splits(y, groups, config):
        assert not set(groups[train]) & set(groups[test])
        assert len(train) + len(test) == len(y)
        assert (folds[repeat][test] == -1).all()  # each sample tested once per repeat
        folds[repeat][test] = folds[repeat].max() + 1
    assert all((f >= 0).all() for f in folds.values())

    def partition(fold: np.ndarray) -> set[frozenset[int]]:
        return {frozenset(np.flatnonzero(fold == k)) for k in np.unique(fold)}

    assert partition(folds[0]) != partition(folds[1]) != partition(folds[2])
    assert partition(folds[0]) != partition(folds[2])


def test_check_cohort_size_counts_patients_not_samples() -> None:
    """Five folds need five patients of each class, however many samples they have."""
    y = np.array([1] * 20 + [0] * 10)
    groups = np.array([f"R{i % 4}" for i in range(20)] + [f"N{i}" for i in range(10)])
    with pytest.raises(ValueError, match="only 4 patients among the responders"):
        check_cohort_size(y, groups, 5)
    check_cohort_size(y, groups, 4)
    with pytest.raises(ValueError, match="only 2 patients among the non-responders"):
        check_cohort_size(np.array([1] * 10 + [0] * 4),
                          np.array([*range(10), 10, 10, 11, 11]), 3)


@pytest.mark.parametrize("seed", range(6))
def test_fast_metrics_match_sklearn_with_ties(seed: int) -> None:
    """The vectorised bootstrap metrics are the scikit-learn definitions, ties included."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(8, 80))
    y = (rng.random(n) < rng.uniform(0.2, 0.8)).astype(int)
    y[:2] = [0, 1]
    levels = int(rng.integers(2, 6))  # few distinct values: heavy ties
    probabilities = np.vstack([rng.integers(0, levels, size=(3, n)) / (levels - 1),
                               rng.random((1, n))])
    fast = fast_metrics(y, probabilities)
    for r, p in enumerate(probabilities):
        assert fast["auroc"][r] == pytest.approx(roc_auc_score(y, p), abs=1e-12)
        assert fast["auprc"][r] == pytest.approx(average_precision_score(y, p), abs=1e-12)
        assert fast["brier"][r] == pytest.approx(brier_score_loss(y, p), abs=1e-12)


def _pairs_with_constant_brier(n_pairs: int, seed: int) -> tuple[np.ndarray, ...]:
    """Pairs of samples sharing a subject and label whose squared errors are c +- d.

    Any resample that keeps pairs whole has Brier exactly c; splitting a pair moves it.
    """
    rng = np.random.default_rng(seed)
    c = 0.09
    d = rng.uniform(0.01, 0.08, size=n_pairs)
    labels = np.arange(n_pairs) % 2
    y = np.repeat(labels, 2)
    error = np.sqrt(np.column_stack([c + d, c - d]).ravel())
    oof = np.where(y == 1, 1 - error, error)[None, :]
    groups = np.repeat([f"P{i}" for i in range(n_pairs)], 2)
    return y, groups, oof, c


def test_bootstrap_resamples_patients_not_samples() -> None:
    """Every resample keeps both episodes of a patient: Brier is then exactly constant."""
    y, groups, oof, c = _pairs_with_constant_brier(30, seed=4)
    boot = bootstrap(y, groups, oof, n_bootstrap=300, seed=1)
    brier = boot["brier"][~np.isnan(boot["brier"])]
    assert len(brier) > 290
    np.testing.assert_allclose(brier, c, rtol=0, atol=1e-12)
    # control: the same data resampled per sample does vary, so the check above can fail
    per_sample = bootstrap(y, np.arange(len(y)), oof, n_bootstrap=300, seed=1)["brier"]
    assert np.nanstd(per_sample) > 1e-3


def test_summary_ci_covers_point_estimate() -> None:
    """The patient-bootstrap 95% interval brackets the mean over repeats."""
    rng = np.random.default_rng(8)
    y, groups = _grouped_labels(60, seed=8)
    oof = expit(1.5 * (y - 0.5) + rng.normal(0, 1.2, size=(3, len(y))))
    summary = summarise(y, groups, oof, CVConfig(n_repeats=3, n_bootstrap=400, seed=2))
    for name in ("auroc", "auprc", "brier"):
        assert summary[f"{name}_ci_low"] < summary[f"{name}_mean"] < summary[f"{name}_ci_high"]
    assert summary["auroc_ci_high"] - summary["auroc_ci_low"] < 0.4
    assert summary["n_repeats"] == 3.0


def test_calibration_of_calibrated_overconfident_and_shifted_probabilities() -> None:
    """Outcomes drawn from p: slope ~1, in-the-large ~0. Doubling the logits halves the slope;
    shifting them by +0.5 gives in-the-large -0.5 with the slope still ~1 (the intercept of
    the slope fit would not say so when the slope is off)."""
    rng = np.random.default_rng(0)
    p = rng.uniform(0.05, 0.95, size=20_000)
    y = (rng.random(p.size) < p).astype(int)
    calibrated = calibration(y, p)
    assert calibrated["calibration_slope"] == pytest.approx(1.0, abs=0.08)
    assert calibrated["calibration_in_the_large"] == pytest.approx(0.0, abs=0.05)
    overconfident = calibration(y, expit(2 * logit(p)))
    assert overconfident["calibration_slope"] == pytest.approx(0.5, abs=0.05)
    shifted = calibration(y, expit(logit(p) + 0.5))
    assert shifted["calibration_in_the_large"] == pytest.approx(-0.5, abs=0.05)
    assert shifted["calibration_slope"] == pytest.approx(1.0, abs=0.08)


def test_paired_difference_of_a_model_with_itself_is_exactly_zero() -> None:
    rng = np.random.default_rng(3)
    y, groups = _grouped_labels(60, seed=3)
    oof = expit(1.5 * (y - 0.5) + rng.normal(0, 1.2, size=(1, len(y))))
    config = CVConfig(n_repeats=1, n_bootstrap=200)
    same = paired_difference(y, groups, oof, oof, config)
    assert same == {"auroc_difference": 0.0, "ci_low": 0.0, "ci_high": 0.0}
    noise = rng.random((1, len(y)))
    better = paired_difference(y, groups, oof, noise, config)
    assert better["ci_low"] > 0 and better["auroc_difference"] > 0.2


def test_net_benefit_of_perfect_predictions_and_of_treating_all() -> None:
    y = np.array([1] * 30 + [0] * 70)
    thresholds = np.array([0.1, 0.3, 0.5])
    curve = net_benefit(y, y.astype(float), thresholds)
    np.testing.assert_allclose(curve["model"], 0.3)  # every responder found, no false ones
    np.testing.assert_allclose(curve["treat_all"], 0.3 - 0.7 * thresholds / (1 - thresholds))
    np.testing.assert_allclose(curve["treat_none"], 0.0)


def test_permutation_by_patient_moves_whole_label_vectors() -> None:
    y = np.array([1, 0, 1, 1, 1, 0, 0, 0, 1])
    groups = np.array(["A", "A", "B", "C", "C", "D", "E", "E", "F"])
    blocks = {g: tuple(y[groups == g]) for g in np.unique(groups)}
    seen = set()
    for seed in range(30):
        permuted = permuted_by_patient(y, groups, np.random.default_rng(seed))
        new = {g: tuple(permuted[groups == g]) for g in np.unique(groups)}
        assert sorted(new.values()) == sorted(blocks.values())  # same blocks, reassigned
        seen.add(tuple(permuted))
    assert len(seen) > 3


def test_shap_stability_of_identical_and_of_unrelated_rankings() -> None:
    names = [f"f{i}" for i in range(20)]
    ranking = pd.Series(np.arange(20.0, 0, -1), index=names)
    same = shap_stability([ranking, ranking, ranking])
    assert same == {"shap_rank_spearman": 1.0, "shap_top10_jaccard": 1.0}
    reversed_ = shap_stability([ranking, pd.Series(np.arange(1.0, 21), index=names)])
    assert reversed_["shap_rank_spearman"] == pytest.approx(-1.0)
    assert reversed_["shap_top10_jaccard"] == 0.0


def test_a_fold_whose_model_uses_no_feature_has_no_ranking_to_compare() -> None:
    names = [f"f{i}" for i in range(20)]
    ranking = pd.Series(np.arange(20.0, 0, -1), index=names)
    empty = pd.Series(0.0, index=names)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no undefined correlation, no mean of nothing
        assert shap_stability([ranking, empty, ranking]) == {
            "shap_rank_spearman": 1.0, "shap_top10_jaccard": 1.0,
            "shap_folds_without_ranking": 1.0}
        assert shap_stability([ranking, empty, empty]) == {"shap_folds_without_ranking": 2.0}


@pytest.fixture(scope="module")
def cv_config() -> CVConfig:
    return CVConfig(n_splits=5, n_repeats=2, n_bootstrap=200, seed=7)


def test_cross_validate_on_shuffled_labels_is_chance(cv_config: CVConfig) -> None:
    """A label-shuffle run must score near 0.5 (the field's standard leakage check)."""
    X, y, groups = cohort(60, seed=5, signal=False)
    result = cross_validate(FAMILIES["linear"].build(FeatureConfig(), 0), X, y, groups,
                            cv_config)
    assert result.oof.shape == (2, len(y)) and not np.isnan(result.oof).any()
    assert 0.3 < result.summary["auroc_mean"] < 0.7


def test_cross_validate_finds_a_strong_signal(cv_config: CVConfig) -> None:
    """When the label follows one genus, out-of-fold AUROC is high and predictions align."""
    X, y, groups = cohort(60, seed=5, signal=True)
    result = cross_validate(FAMILIES["linear"].build(FeatureConfig(), 0), X, y, groups,
                            cv_config)
    assert result.summary["auroc_mean"] > 0.8
    assert result.summary["auroc_ci_low"] <= result.summary["auroc_mean"]
    frame = result.predictions(X.index)
    assert list(frame.columns) == ["subject-id", "responded", "repeat_0", "repeat_1"]
    assert roc_auc_score(frame["responded"], frame["repeat_0"]) > 0.8


def test_the_roc_figure_bands_over_the_outer_folds(cv_config: CVConfig) -> None:
    """Each sample keeps its outer fold, and the ROC figure draws one curve per fold with the
    band over them; a single scored set (external validation) gets the bootstrap band."""
    X, y, groups = cohort(60, seed=5, signal=True)
    result = cross_validate(FAMILIES["linear"].build(FeatureConfig(), 0), X, y, groups,
                            cv_config)
    for k, (repeat, _, test) in enumerate(grouped_splits(y, groups, cv_config, X)):
        assert (result.folds[repeat, test] == k).all()
    assert result.folds.min() == 0 and result.folds.max() == 9
    axes = roc_figure(result, "nested CV").axes[0]
    legend = [text.get_text() for text in axes.get_legend().get_texts()]
    assert "fold mean +- 1 SD (10 folds)" in legend
    assert sum(line.get_linewidth() == 0.6 for line in axes.lines) == 10
    external = roc_figure(replace(result, oof=result.oof[:1], folds=None), "external").axes[0]
    assert "95% band (bootstrap)" in [t.get_text() for t in external.get_legend().get_texts()]
