"""Leak-free performance estimates: nested, repeated, stratified, patient-grouped CV.

Outer loop: repeated StratifiedGroupKFold for the estimate. Inner loop (training.tuning):
everything that is chosen or fitted (filtering, CLR, imputation, scaling, hyperparameters,
family, feature set, recalibration, threshold) is chosen or fitted on the outer training
fold only, so the reported score includes the selection step. Samples of one patient never
straddle folds, and uncertainty comes from a bootstrap over patients, not over folds (folds
share training data, so their spread understates the uncertainty).

The same outer folds also score the best clinical-only, microbiome-only and combined models
and the best of each family, so their differences are paired (same patients, same splits).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import combinations
from typing import Any

import numpy as np
import pandas as pd
from joblib import Parallel, delayed
from scipy.optimize import brentq
from scipy.special import expit, logit
from scipy.stats import rankdata, spearmanr
from sklearn.base import BaseEstimator, clone
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score, brier_score_loss, roc_auc_score

from training.compute import progress, single_threaded_fit
from training.folds import TreatmentStratifiedGroupKFold
from training.model import FEATURE_SETS

log = logging.getLogger(__name__)

METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "auroc": roc_auc_score,
    "auprc": average_precision_score,
    "brier": brier_score_loss,
}


CHAMPION = "champion"
EPS = 1e-6


@dataclass(frozen=True)
class CVConfig:
    """The outer loop: folds, repeats, patient-bootstrap resamples, seed, parallel fits."""

    n_splits: int = 5
    n_repeats: int = 1
    n_bootstrap: int = 1000
    seed: int = 7
    n_jobs: int = 1


@dataclass(frozen=True)
class CVResult:
    y: np.ndarray
    groups: np.ndarray
    oof: np.ndarray  # (n_repeats, n): out-of-fold probability of response
    summary: dict[str, float]  # <metric>_mean, <metric>_ci_low, <metric>_ci_high, calibration
    folds: np.ndarray | None = None  # (n_repeats, n): outer fold of each sample; None: one set

    def predictions(self, index: pd.Index) -> pd.DataFrame:
        """Out-of-fold predictions, one column per repeat, for inspection and plots."""
        columns = {f"repeat_{r}": self.oof[r] for r in range(len(self.oof))}
        return pd.DataFrame({"subject-id": self.groups, "responded": self.y, **columns},
                            index=index)


def grouped_splits(
    y: np.ndarray, groups: np.ndarray, config: CVConfig, X: pd.DataFrame | None = None
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(repeat, train, test) over repeated patient-grouped K-fold, stratified by outcome and,
    when X carries it, treatment (training.folds); each repeat reshuffled."""
    for repeat in range(config.n_repeats):
        cv = TreatmentStratifiedGroupKFold(config.n_splits, shuffle=True,
                                           random_state=config.seed + repeat)
        for train, test in cv.split(X if X is not None else np.zeros(len(y)), y, groups):
            yield repeat, train, test


def _fit_predict(
    estimator: BaseEstimator, X: pd.DataFrame, y: np.ndarray, groups: np.ndarray,
    train: np.ndarray, test: np.ndarray,
) -> np.ndarray:
    fitted = _fit(estimator, X.iloc[train], y[train], groups[train])
    return fitted.predict_proba(X.iloc[test])[:, 1]


def _fit(estimator: BaseEstimator, X: pd.DataFrame, y: np.ndarray, groups: np.ndarray
         ) -> Any:
    """Fit a clone; estimators that tune with grouped inner CV get the patients too."""
    fitted = clone(estimator)
    if "groups" in inspect.signature(fitted.fit).parameters:
        return fitted.fit(X, y, groups=groups)
    return fitted.fit(X, y)


def cross_validate(
    estimator: BaseEstimator, X: pd.DataFrame, y: np.ndarray, groups: np.ndarray,
    config: CVConfig,
) -> CVResult:
    """Out-of-fold probabilities for every repeat, and metrics with patient-bootstrap CIs.

    `estimator` may be a plain pipeline or a `ModelSearch`: whatever it tunes, it tunes on
    the training fold only.
    """
    y = np.asarray(y)
    groups = np.asarray(groups)
    check_cohort_size(y, groups, config.n_splits)
    splits = list(grouped_splits(y, groups, config, X))
    predicted = Parallel(n_jobs=config.n_jobs)(
        delayed(_fit_predict)(estimator, X, y, groups, train, test) for _, train, test in splits
    )
    oof = np.full((config.n_repeats, len(y)), np.nan)
    for (repeat, _, test), probabilities in zip(splits, predicted, strict=True):
        oof[repeat, test] = probabilities
    folds = _fold_numbers([(repeat, test) for repeat, _, test in splits], oof.shape)
    return CVResult(y, groups, oof, summarise(y, groups, oof, config), folds)


def _fold_numbers(tests: list[tuple[int, np.ndarray]], shape: tuple[int, ...]) -> np.ndarray:
    """Each sample's outer fold per repeat (for per-fold curves)."""
    folds = np.full(shape, -1)
    for k, (repeat, test) in enumerate(tests):
        folds[repeat, test] = k
    return folds


@dataclass(frozen=True)
class FoldRecord:
    """What the inner loop chose on one outer training fold, and what it meant on the test
    fold: the audit trail of nested CV."""

    repeat: int
    fold: int
    family: str
    feature_set: str
    params: dict[str, Any]
    inner_score: float
    intercept: float
    slope: float
    forest_slope: float  # the stacked forest's weight; 0 when dropped or not stacked
    threshold: float
    importance: pd.Series  # mean |SHAP| per input feature on the outer test fold


@dataclass(frozen=True)
class NestedResult:
    """Out-of-fold predictions of the champion procedure and of each feature set and family
    (the best of that region by inner CV), all on the same outer folds."""

    results: dict[str, CVResult]  # "champion", "set:<feature set>", "family:<family>"
    folds: list[FoldRecord]
    comparisons: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def champion(self) -> CVResult:
        return self.results[CHAMPION]


def _outer_fold(
    search: BaseEstimator, X: pd.DataFrame, y: np.ndarray, groups: np.ndarray,
    repeat: int, fold: int, train: np.ndarray, test: np.ndarray, regions: bool,
    parallel: bool = False,
) -> tuple[dict[str, np.ndarray], FoldRecord]:
    with single_threaded_fit(parallel):
        return _score_outer_fold(search, X, y, groups, repeat, fold, train, test, regions)


def _score_outer_fold(
    search: BaseEstimator, X: pd.DataFrame, y: np.ndarray, groups: np.ndarray,
    repeat: int, fold: int, train: np.ndarray, test: np.ndarray, regions: bool,
) -> tuple[dict[str, np.ndarray], FoldRecord]:
    from training.explain import ShapExplainer

    X_train, y_train, X_test = X.iloc[train], y[train], X.iloc[test]
    fitted = _fit(search, X_train, y_train, groups[train])
    predicted = {CHAMPION: fitted.predict_proba(X_test)[:, 1]}
    best = fitted.best_
    if regions:
        for name, family, features in (
            *((f"set:{s}", None, s) for s in FEATURE_SETS),
            *((f"family:{f}", f, None) for f in fitted.families),
        ):
            try:
                row = fitted.best_of(family, features)
            except ValueError:
                continue
            same = row.name == best.name
            model = fitted.model_.pipeline_ if same else fitted.refit_best(
                X_train, y_train, family, features)
            predicted[name] = model.predict_proba(X_test)[:, 1]
    model = fitted.model_
    record = FoldRecord(
        repeat=repeat, fold=fold, family=str(best["family"]),
        feature_set=str(best["feature_set"]), params=dict(best["params"]),
        inner_score=float(best["inner_score"]), intercept=model.intercept_,
        slope=model.slope_, forest_slope=model.companion_slope_, threshold=model.threshold_,
        importance=ShapExplainer(model).explain(X_test).mean_abs() if regions else pd.Series(),
    )
    return predicted, record


def nested_cross_validate(
    search: BaseEstimator, X: pd.DataFrame, y: np.ndarray, groups: np.ndarray,
    config: CVConfig, regions: bool = True, what: str = "nested CV",
) -> NestedResult:
    """Nested CV of a `ModelSearch`: the outer folds score the whole choosing procedure.

    With `regions`, each outer fold also refits the inner-best configuration of every
    feature set and family and records SHAP importances (for stability); without, only the
    champion procedure is scored (the permutation control).
    """
    y = np.asarray(y)
    groups = np.asarray(groups)
    check_cohort_size(y, groups, config.n_splits, getattr(search, "inner_splits", 0))
    splits = [(r, k, train, test) for k, (r, train, test) in
              enumerate(grouped_splits(y, groups, config, X))]
    jobs = Parallel(n_jobs=config.n_jobs, return_as="generator")(
        delayed(_outer_fold)(search, X, y, groups, r, k % config.n_splits, train, test,
                             regions, config.n_jobs != 1)
        for r, k, train, test in splits
    )
    outputs = list(progress(jobs, len(splits), what))
    keys = list(dict.fromkeys(key for predicted, _ in outputs for key in predicted))
    oof = {key: np.full((config.n_repeats, len(y)), np.nan) for key in keys}
    for (repeat, _, _, test), (predicted, _) in zip(splits, outputs, strict=True):
        for key, probabilities in predicted.items():
            oof[key][repeat, test] = probabilities
    folds = _fold_numbers([(repeat, test) for repeat, _, _, test in splits], (config.n_repeats,
                                                                              len(y)))
    results = {
        key: CVResult(y, groups, values,
                      summarise(y, groups, values, config, calibration_ci=key == CHAMPION),
                      folds)
        for key, values in oof.items() if not np.isnan(values).any()
    }
    comparisons = {
        f"{a}-vs-{b}": paired_difference(y, groups, oof[f"set:{a}"], oof[f"set:{b}"], config)
        for a, b in (("combined", "clinical"), ("microbiome", "clinical"))
        if f"set:{a}" in results and f"set:{b}" in results
    }
    return NestedResult(results, [record for _, record in outputs], comparisons)


def paired_difference(y: np.ndarray, groups: np.ndarray, a: np.ndarray, b: np.ndarray,
                      config: CVConfig) -> dict[str, float]:
    """AUROC(a) - AUROC(b) on the same patients and folds, with a paired patient-bootstrap
    95% CI (the same resamples for both, so shared noise cancels)."""
    point = float(np.mean([roc_auc_score(y, pa) - roc_auc_score(y, pb)
                           for pa, pb in zip(a, b, strict=True)]))
    boot_a = bootstrap(y, groups, a, config.n_bootstrap, config.seed)["auroc"]
    boot_b = bootstrap(y, groups, b, config.n_bootstrap, config.seed)["auroc"]
    low, high = np.nanpercentile(boot_a - boot_b, [2.5, 97.5])
    return {"auroc_difference": point, "ci_low": float(low), "ci_high": float(high)}


def permuted_by_patient(y: np.ndarray, groups: np.ndarray, rng: np.random.Generator
                        ) -> np.ndarray:
    """Labels permuted between patients, each patient keeping a whole label vector.

    Patients are exchanged only with patients who have as many episodes, so the
    within-patient correlation of outcomes, which grouped CV must respect, is kept.
    """
    codes, _ = pd.factorize(groups)
    members = [np.flatnonzero(codes == c) for c in range(codes.max() + 1)]
    permuted = np.array(y, copy=True)
    sizes = np.array([len(m) for m in members])
    for size in np.unique(sizes):
        same = np.flatnonzero(sizes == size)
        for target, source in zip(same, rng.permutation(same), strict=True):
            permuted[members[target]] = y[members[source]]
    return permuted


def permutation_control(
    search: BaseEstimator, X: pd.DataFrame, y: np.ndarray, groups: np.ndarray,
    config: CVConfig, n_permutations: int,
) -> list[float]:
    """Nested-CV AUROC of the whole procedure on labels permuted by patient: must be ~0.5.

    A value far from 0.5 means information about the label reaches the model by another
    route (leakage through a fitted step, the selection, or the patient structure).
    """
    rng = np.random.default_rng(config.seed)
    control = CVConfig(config.n_splits, 1, 100, config.seed, config.n_jobs)
    return [
        nested_cross_validate(search, X, permuted_by_patient(y, groups, rng), groups, control,
                              regions=False, what=f"permutation {i + 1}/{n_permutations}"
                              ).champion.summary["auroc_mean"]
        for i in range(n_permutations)
    ]


def shap_stability(importances: list[pd.Series], top: int = 10) -> dict[str, float]:
    """How much the global SHAP ranking moves between outer folds: mean pairwise Spearman
    correlation of mean |SHAP| and mean Jaccard overlap of the top features.

    A fold whose model uses no feature (a lasso at its heaviest penalty on a small cohort:
    every importance equal) has no ranking to compare; such folds are left out and counted
    in `shap_folds_without_ranking`, and with fewer than two left there is no statistic."""
    if len(importances) < 2:
        return {}
    frame = pd.concat(importances, axis=1).fillna(0.0)
    ranked = frame.nunique(axis=0) > 1
    without = {"shap_folds_without_ranking": float((~ranked).sum())} if not ranked.all() else {}
    frame = frame.loc[:, ranked]
    if frame.shape[1] < 2:
        return without
    rhos, jaccards = [], []
    for i, j in combinations(range(frame.shape[1]), 2):
        rhos.append(spearmanr(frame.iloc[:, i], frame.iloc[:, j]).statistic)
        a = set(frame.iloc[:, i].nlargest(top).index)
        b = set(frame.iloc[:, j].nlargest(top).index)
        jaccards.append(len(a & b) / len(a | b))
    return {"shap_rank_spearman": float(np.mean(rhos)),
            f"shap_top{top}_jaccard": float(np.mean(jaccards)), **without}


def check_cohort_size(y: np.ndarray, groups: np.ndarray, n_splits: int,
                      inner_splits: int = 0) -> None:
    """Refuse cohorts too small to give every fold both outcomes.

    Nested CV needs each class in every outer fold and, within each outer training fold
    (about (k-1)/k of the patients), in every inner fold too.
    """
    need = n_splits
    if inner_splits:
        need = max(need, -(-inner_splits * n_splits // (n_splits - 1)))
    for label, name in ((1, "responders"), (0, "non-responders")):
        patients = len(np.unique(groups[y == label]))
        if patients < need:
            scheme = (f"{n_splits}-fold cross-validation" if not inner_splits else
                      f"nested cross-validation with {n_splits} outer and {inner_splits} inner "
                      f"folds")
            raise ValueError(
                f"only {patients} patients among the {name}: need at least {need} "
                f"for {scheme}; a cohort this small cannot support a validated model"
            )


def repeat_metrics(y: np.ndarray, oof: np.ndarray) -> pd.DataFrame:
    """One row per repeat: each metric on that repeat's pooled out-of-fold predictions."""
    rows = [{name: metric(y, p) for name, metric in METRICS.items()} | calibration(y, p)
            for p in oof]
    return pd.DataFrame(rows)


def calibration(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    """Calibration slope and calibration-in-the-large (ideal 1 and 0).

    Slope: the coefficient of logit(p) in a logistic regression of the outcome on it; below
    1 means overconfident. In-the-large: the intercept with logit(p) as an offset (slope fixed
    at 1), i.e. whether predictions are too high or too low on average. They are separate
    fits: the intercept of the slope fit is not calibration-in-the-large.
    """
    z = logit(np.clip(p, EPS, 1 - EPS))
    slope = float(LogisticRegression(C=np.inf).fit(z.reshape(-1, 1), y).coef_[0, 0])
    return {"calibration_slope": slope, "calibration_in_the_large": _in_the_large(y, z)}


def _in_the_large(y: np.ndarray, z: np.ndarray) -> float:
    """a such that the mean of expit(a + z) equals the observed rate (the offset MLE)."""
    rate = float(np.mean(y))
    if rate in (0.0, 1.0):
        return float("nan")
    return float(brentq(lambda a: expit(a + z).mean() - rate, -30.0, 30.0))


def summarise(
    y: np.ndarray, groups: np.ndarray, oof: np.ndarray, config: CVConfig,
    calibration_ci: bool = False,
) -> dict[str, float]:
    """Mean over repeats, with a 95% percentile CI from resampling patients.

    Calibration CIs need a logistic fit per resample, so they are computed only when asked
    (for the served model), on up to 500 resamples.
    """
    summary = {f"{k}_mean": float(v) for k, v in repeat_metrics(y, oof).mean().items()}
    boot = bootstrap(y, groups, oof, config.n_bootstrap, config.seed)
    if calibration_ci:
        boot |= bootstrap_calibration(y, groups, oof, min(config.n_bootstrap, 500),
                                      config.seed)
    for name, values in boot.items():
        low, high = np.nanpercentile(values, [2.5, 97.5])
        summary[f"{name}_ci_low"], summary[f"{name}_ci_high"] = float(low), float(high)
    summary["n_repeats"] = float(len(oof))
    return summary


def _patients(groups: np.ndarray) -> list[np.ndarray]:
    """Sample positions of each patient, for resampling whole patients."""
    codes, _ = pd.factorize(groups)
    order = np.argsort(codes, kind="stable")
    starts = np.searchsorted(codes[order], np.arange(codes.max() + 1))
    return np.split(order, starts[1:])


def patient_resamples(y: np.ndarray, groups: np.ndarray, n_bootstrap: int, seed: int
               ) -> Iterator[tuple[int, np.ndarray]]:
    """Patient-level bootstrap resamples holding both outcomes. One seed, one sequence: two
    models resampled with the same seed are compared on the same patients (paired)."""
    rng = np.random.default_rng(seed)
    members = _patients(groups)
    for b in range(n_bootstrap):
        index = np.concatenate([members[g] for g in rng.integers(0, len(members), len(members))])
        if 0 < y[index].sum() < len(index):
            yield b, index


def bootstrap(
    y: np.ndarray, groups: np.ndarray, oof: np.ndarray, n_bootstrap: int, seed: int
) -> dict[str, np.ndarray]:
    """Metric distributions over patient-level bootstrap resamples, averaged over repeats."""
    results = {name: np.full(n_bootstrap, np.nan) for name in METRICS}
    for b, index in patient_resamples(y, groups, n_bootstrap, seed):
        for name, value in fast_metrics(y[index], oof[:, index]).items():
            results[name][b] = value.mean()
    return results


def bootstrap_calibration(y: np.ndarray, groups: np.ndarray, oof: np.ndarray,
                          n_bootstrap: int, seed: int) -> dict[str, np.ndarray]:
    """Calibration slope and in-the-large over the same patient resamples as `bootstrap`."""
    results = {name: np.full(n_bootstrap, np.nan)
               for name in ("calibration_slope", "calibration_in_the_large")}
    for b, index in patient_resamples(y, groups, n_bootstrap, seed):
        per_repeat = [calibration(y[index], p[index]) for p in oof]
        for name in results:
            results[name][b] = np.mean([c[name] for c in per_repeat])
    return results


def net_benefit(y: np.ndarray, p: np.ndarray, thresholds: np.ndarray
                ) -> dict[str, np.ndarray]:
    """Decision curve (Vickers 2006): net benefit of acting on p >= t, of acting on everyone
    and of acting on no one, per threshold probability t."""
    y = np.asarray(y)
    n, prevalence = len(y), float(np.mean(y))
    odds = thresholds / (1 - thresholds)
    model = np.array([((p >= t) & (y == 1)).sum() / n - ((p >= t) & (y == 0)).sum() / n * o
                      for t, o in zip(thresholds, odds, strict=True)])
    return {"threshold": thresholds, "model": model,
            "treat_all": prevalence - (1 - prevalence) * odds,
            "treat_none": np.zeros_like(thresholds)}


def fast_metrics(y: np.ndarray, probabilities: np.ndarray) -> dict[str, np.ndarray]:
    """AUROC, average precision and Brier score of each row of `probabilities`, vectorised.

    Same definitions as scikit-learn's (tests hold them equal, ties included) without its
    per-call validation, which dominates the cost of a thousand bootstrap resamples.
    """
    positive = y == 1
    n_pos, n_neg = positive.sum(), (~positive).sum()
    ranks = rankdata(probabilities, axis=1)
    auroc = (ranks[:, positive].sum(axis=1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    brier = ((probabilities - y) ** 2).mean(axis=1)
    auprc = np.array([_average_precision(y, p) for p in probabilities])
    return {"auroc": auroc, "auprc": auprc, "brier": brier}


def _average_precision(y: np.ndarray, p: np.ndarray) -> float:
    order = np.argsort(-p, kind="mergesort")
    p, y = p[order], y[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(p)), len(p) - 1]
    true_pos = np.cumsum(y)[last_of_tie]
    precision = true_pos / (last_of_tie + 1)
    recall = true_pos / true_pos[-1]
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))
