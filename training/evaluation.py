"""Leak-free performance estimates: repeated, stratified, subject-grouped cross-validation.

The whole pipeline (filtering, CLR, imputation, scaling, the estimator) is refitted inside
every training fold, samples of one patient never straddle folds, and uncertainty comes from
a bootstrap over patients, not over folds (folds share training data, so their spread
understates the uncertainty).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd
from joblib import Parallel, delayed
from scipy.special import logit
from scipy.stats import rankdata
from sklearn.base import clone
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score, brier_score_loss, roc_auc_score
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.pipeline import Pipeline

METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "auroc": roc_auc_score,
    "auprc": average_precision_score,
    "brier": brier_score_loss,
}


@dataclass(frozen=True)
class CVConfig:
    n_splits: int = 5
    n_repeats: int = 5
    n_bootstrap: int = 1000
    seed: int = 7
    n_jobs: int = 1


@dataclass(frozen=True)
class CVResult:
    y: np.ndarray
    groups: np.ndarray
    oof: np.ndarray  # (n_repeats, n): out-of-fold probability of response
    summary: dict[str, float]  # <metric>_mean, <metric>_ci_low, <metric>_ci_high, calibration

    def predictions(self, index: pd.Index) -> pd.DataFrame:
        """Out-of-fold predictions, one column per repeat, for inspection and plots."""
        columns = {f"repeat_{r}": self.oof[r] for r in range(len(self.oof))}
        return pd.DataFrame({"subject-id": self.groups, "responded": self.y, **columns},
                            index=index)


def grouped_splits(
    y: np.ndarray, groups: np.ndarray, config: CVConfig
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(repeat, train, test) over repeated StratifiedGroupKFold; each repeat reshuffled."""
    for repeat in range(config.n_repeats):
        cv = StratifiedGroupKFold(config.n_splits, shuffle=True, random_state=config.seed + repeat)
        for train, test in cv.split(np.zeros(len(y)), y, groups):
            yield repeat, train, test


def _fit_predict(
    pipeline: Pipeline, X: pd.DataFrame, y: np.ndarray, train: np.ndarray, test: np.ndarray
) -> np.ndarray:
    fitted = clone(pipeline).fit(X.iloc[train], y[train])
    return fitted.predict_proba(X.iloc[test])[:, 1]


def cross_validate(
    pipeline: Pipeline, X: pd.DataFrame, y: np.ndarray, groups: np.ndarray, config: CVConfig
) -> CVResult:
    """Out-of-fold probabilities for every repeat, and metrics with patient-bootstrap CIs."""
    y = np.asarray(y)
    groups = np.asarray(groups)
    check_cohort_size(y, groups, config.n_splits)
    splits = list(grouped_splits(y, groups, config))
    predicted = Parallel(n_jobs=config.n_jobs)(
        delayed(_fit_predict)(pipeline, X, y, train, test) for _, train, test in splits
    )
    oof = np.full((config.n_repeats, len(y)), np.nan)
    for (repeat, _, test), probabilities in zip(splits, predicted, strict=True):
        oof[repeat, test] = probabilities
    return CVResult(y, groups, oof, summarise(y, groups, oof, config))


def check_cohort_size(y: np.ndarray, groups: np.ndarray, n_splits: int) -> None:
    """Refuse cohorts too small to give every fold both outcomes."""
    for label, name in ((1, "responders"), (0, "non-responders")):
        patients = len(np.unique(groups[y == label]))
        if patients < n_splits:
            raise ValueError(
                f"only {patients} patients among the {name}: need at least {n_splits} "
                f"(one per fold) for {n_splits}-fold cross-validation"
            )


def repeat_metrics(y: np.ndarray, oof: np.ndarray) -> pd.DataFrame:
    """One row per repeat: each metric on that repeat's pooled out-of-fold predictions."""
    rows = [{name: metric(y, p) for name, metric in METRICS.items()} | calibration(y, p)
            for p in oof]
    return pd.DataFrame(rows)


def calibration(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    """Calibration intercept and slope (logistic recalibration; ideal 0 and 1).

    Clinicians act on the probability itself, so a ranking metric alone is not enough.
    """
    z = logit(np.clip(p, 1e-6, 1 - 1e-6)).reshape(-1, 1)
    fit = LogisticRegression(C=np.inf).fit(z, y)
    return {"calibration_slope": float(fit.coef_[0, 0]),
            "calibration_intercept": float(fit.intercept_[0])}


def summarise(
    y: np.ndarray, groups: np.ndarray, oof: np.ndarray, config: CVConfig
) -> dict[str, float]:
    """Mean over repeats, with a 95% percentile CI from resampling patients."""
    summary = {f"{k}_mean": float(v) for k, v in repeat_metrics(y, oof).mean().items()}
    boot = bootstrap(y, groups, oof, config.n_bootstrap, config.seed)
    for name in METRICS:
        low, high = np.nanpercentile(boot[name], [2.5, 97.5])
        summary[f"{name}_ci_low"], summary[f"{name}_ci_high"] = float(low), float(high)
    summary["n_repeats"] = float(len(oof))
    return summary


def bootstrap(
    y: np.ndarray, groups: np.ndarray, oof: np.ndarray, n_bootstrap: int, seed: int
) -> dict[str, np.ndarray]:
    """Metric distributions over patient-level bootstrap resamples, averaged over repeats."""
    rng = np.random.default_rng(seed)
    codes, _ = pd.factorize(groups)
    order = np.argsort(codes, kind="stable")
    starts = np.searchsorted(codes[order], np.arange(codes.max() + 1))
    members = np.split(order, starts[1:])
    results = {name: np.full(n_bootstrap, np.nan) for name in METRICS}
    for b in range(n_bootstrap):
        index = np.concatenate([members[g] for g in rng.integers(0, len(members), len(members))])
        if 0 < y[index].sum() < len(index):
            for name, value in fast_metrics(y[index], oof[:, index]).items():
                results[name][b] = value.mean()
    return results


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
