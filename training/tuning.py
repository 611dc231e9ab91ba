"""Inner cross-validation: choose family, feature set and hyperparameters; then recalibrate.

`ModelSearch` is one scikit-learn estimator that does all the choosing, so the outer loop of
nested CV (training.evaluation) can refit it per fold and the reported score includes the
selection step (no winner's curse). Its fitted `model_` is a `ResponseModel`: the chosen
pipeline, stacked with a random forest, plus a logistic recalibration fitted on their own
out-of-fold predictions (which is also the stacking), and the decision threshold chosen on
them. That `ResponseModel` is what gets registered and served.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

import numpy as np
import pandas as pd
from scipy.special import expit, logit
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_curve
from sklearn.model_selection import GridSearchCV, RandomizedSearchCV
from sklearn.pipeline import Pipeline
from sklearn.utils.validation import check_is_fitted

from training.folds import TreatmentStratifiedGroupKFold
from training.model import (
    FAMILIES,
    FEATURE_STEPS,
    PRESET_RANKS,
    FeatureConfig,
    feature_set,
    stacked_forest,
)
from training.structure import in_block

log = logging.getLogger(__name__)

EPS = 1e-6
FLAT_SLOPE = 0.05  # recalibration slope below which the model has no out-of-fold signal


def margin(pipeline: Pipeline, X: pd.DataFrame) -> np.ndarray:
    """The pipeline's log-odds of response (its estimator's raw margin, not logit of a
    rounded probability), so recalibrated log-odds and SHAP values agree to float precision."""
    estimator = pipeline[-1]
    if hasattr(estimator, "decision_function"):
        return np.asarray(pipeline.decision_function(X), dtype=np.float64)
    return np.asarray(estimator.predict(pipeline[:-1].transform(X), output_margin=True),
                      dtype=np.float64)


def recalibration(y: np.ndarray, log_odds: np.ndarray) -> tuple[float, np.ndarray]:
    """(intercept, slopes) of logit P(y) = a + sum_k b_k z_k over out-of-fold log-odds z
    (one column per model): the affine map that makes them calibrated and, with two or more
    models, the stacking weights of each (Breiman's stacked generalisation, constrained to
    non-negative weights). A model whose slope comes out <= 0 adds no out-of-fold signal
    beside the others: it gets weight 0 and the rest are refitted; when none is left, the map
    collapses to the base rate rather than inverting a ranking."""
    z = np.asarray(log_odds, dtype=np.float64)
    z = z.reshape(len(z), -1)
    slopes = np.zeros(z.shape[1])
    used = np.ones(z.shape[1], dtype=bool)
    while used.any():
        fit = LogisticRegression(C=np.inf).fit(z[:, used], y)
        if (fit.coef_[0] > 0).all():
            slopes[used] = fit.coef_[0]
            return float(fit.intercept_[0]), slopes
        used[np.flatnonzero(used)[np.argmin(fit.coef_[0])]] = False
    return float(logit(np.clip(np.mean(y), EPS, 1 - EPS))), slopes


def out_of_fold_log_odds(pipeline: Pipeline, X: pd.DataFrame, y: np.ndarray,
                         splits: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Each sample's log-odds from the pipeline fitted without its fold. Not
    `cross_val_predict`: XGBoost has no `decision_function`, and logit of its rounded
    probabilities would not be the margin its SHAP values add up to."""
    z = np.empty(len(y))
    for train, test in splits:
        z[test] = margin(clone(pipeline).fit(X.iloc[train], y[train]), X.iloc[test])
    return z


def youden_threshold(y: np.ndarray, p: np.ndarray) -> float:
    """Probability cut-off that maximises sensitivity + specificity - 1."""
    fpr, tpr, thresholds = roc_curve(y, p)
    best = int(np.argmax(tpr - fpr))
    return float(np.clip(thresholds[best], EPS, 1 - EPS))


class ResponseModel(ClassifierMixin, BaseEstimator):
    """A pipeline, recalibrated on its own out-of-fold predictions, with a decision threshold;
    optionally stacked with a companion pipeline.

    Penalised and tree models trained on a few hundred episodes are over- or under-confident;
    clinicians act on the probability itself. `fit` runs grouped CV of the pipeline on the
    training data, fits logit P(response) = intercept + slope * log-odds on those out-of-fold
    predictions, chooses the threshold (`"youden"` or a fixed probability) on the
    recalibrated ones, and refits the pipeline on all the data. Recalibrated log-odds are
    affine in the pipeline's, so SHAP values rescaled by `slope_` stay exact.

    With a `companion` (a random forest beside the chosen linear model), the same grouped CV
    scores both on the same folds and one logistic fit on their two out-of-fold log-odds is
    both the recalibration and the stacking: served log-odds = intercept + slope * pipeline's
    + companion_slope * companion's. A weight that comes out <= 0 drops the companion
    (`companion_` is None). Exact SHAP stays a weighted sum of the two models' exact values.

    The map is fitted on fold models but applied to the final one, which saw all the data
    and ranks better: fold models trained on two thirds of it made the map too flat (test
    calibration slope 1.50 at a 95% response rate, up to 1.22 elsewhere; docs/benchmarks.md).
    Five folds (four fifths of the data each) bring those to 0.82-1.13.
    """

    # Models registered before stacking have no companion: these defaults let them load.
    companion_: Pipeline | None = None
    companion_slope_: float = 0.0

    def __init__(self, pipeline: Pipeline, n_splits: int = 5, seed: int = 7,
                 threshold: str | float = "youden", companion: Pipeline | None = None) -> None:
        self.pipeline = pipeline
        self.n_splits = n_splits
        self.seed = seed
        self.threshold = threshold
        self.companion = companion

    def fit(self, X: pd.DataFrame, y: np.ndarray, groups: np.ndarray | None = None
            ) -> ResponseModel:
        y = np.asarray(y)
        groups = np.arange(len(y)) if groups is None else np.asarray(groups)
        cv = TreatmentStratifiedGroupKFold(self.n_splits, shuffle=True, random_state=self.seed)
        splits = list(cv.split(X, y, groups))
        members = [self.pipeline] if self.companion is None else [self.pipeline,
                                                                   self.companion]
        oof = np.column_stack([out_of_fold_log_odds(m, X, y, splits) for m in members])
        self.intercept_, slopes = recalibration(y, oof)
        self.slope_ = float(slopes[0])
        self.companion_slope_ = float(slopes[1]) if len(slopes) > 1 else 0.0
        calibrated = expit(self.intercept_ + oof @ slopes)
        self.threshold_ = (youden_threshold(y, calibrated) if self.threshold == "youden"
                           else float(self.threshold))
        self.pipeline_ = clone(self.pipeline).fit(X, y)
        self.companion_ = (clone(self.companion).fit(X, y) if self.companion_slope_ > 0
                           else None)
        self.classes_ = self.pipeline_.classes_
        return self

    def members(self) -> list[tuple[Pipeline, float]]:
        """The fitted pipelines with their weights in the served log-odds."""
        check_is_fitted(self, "pipeline_")
        members = [(self.pipeline_, self.slope_)]
        if self.companion_ is not None:
            members.append((self.companion_, self.companion_slope_))
        return members

    @property
    def flat(self) -> bool:
        """True when out-of-fold predictions carried (almost) no ranking information."""
        check_is_fitted(self, "slope_")
        return max(self.slope_, self.companion_slope_) < FLAT_SLOPE

    def decision_function(self, X: pd.DataFrame) -> np.ndarray:
        """Recalibrated (and stacked) log-odds of response."""
        return self.intercept_ + sum(weight * margin(pipeline, X)
                                     for pipeline, weight in self.members())

    def predict_proba(self, X: pd.DataFrame) -> np.ndarray:
        p = expit(self.decision_function(X))
        return np.column_stack([1 - p, p])

    def predict(self, X: pd.DataFrame) -> np.ndarray:
        return (self.predict_proba(X)[:, 1] >= self.threshold_).astype(int)


class ModelSearch(ClassifierMixin, BaseEstimator):
    """Grouped inner CV over families x feature sets x hyperparameters, best by `scoring`.

    The label-free feature steps (taxonomy vocabulary, prevalence filter, CLR, clinical
    encoding, and a family's `SearchForm.prepare`, such as the linear design) are fitted once
    on the data `fit` is given, which in nested CV is the outer training fold; every
    configuration's supervised part (block selection and weights, estimator) is then scored
    on the same grouped inner folds of those features. Anything that sees the
    label, and every choice, is thus made inside the inner folds, and the outer test fold is
    never seen. The best configuration is refitted from raw inputs as a `ResponseModel`
    (`model_`), stacked with a random forest on the same rank and feature set (`stack`;
    training.model.stacked_forest) whose weight is fitted out of fold. `results_` holds
    every configuration's inner score, so the outer loop can also refit the best of one
    feature set or family (`refit_best`) and score it on the same folds.
    """

    def __init__(self, families: tuple[str, ...] = ("linear",),
                 features: FeatureConfig | None = None, preset: str = "fast",
                 inner_splits: int = 3, seed: int = 7, threshold: str | float = "youden",
                 scoring: str = "roc_auc", selection: str = "one_se",
                 ranks: tuple[str, ...] | None = None, stack: bool = True) -> None:
        self.families = families
        self.features = features
        self.preset = preset
        self.inner_splits = inner_splits
        self.seed = seed
        self.threshold = threshold
        self.scoring = scoring
        self.selection = selection
        self.ranks = ranks
        self.stack = stack

    def _cv(self) -> TreatmentStratifiedGroupKFold:
        return TreatmentStratifiedGroupKFold(self.inner_splits, shuffle=True,
                                             random_state=self.seed)

    def _config(self, rank: str) -> FeatureConfig:
        """The preprocessing at one rank: the rank sets the pipeline's structure (one
        composition per taxonomic rank it holds), not only the aligner's parameter."""
        return replace(self.features or FeatureConfig(), rank=rank)

    def _pipeline(self, family: str, rank: str) -> Pipeline:
        return FAMILIES[family].build(self._config(rank), self.seed)

    def fit(self, X: pd.DataFrame, y: np.ndarray, groups: np.ndarray | None = None
            ) -> ModelSearch:
        unknown = sorted(set(self.families) - set(FAMILIES))
        if unknown:
            raise ValueError(f"unknown model family {unknown}; choose from {sorted(FAMILIES)}")
        y = np.asarray(y)
        groups = np.arange(len(y)) if groups is None else np.asarray(groups)
        rows, tables = [], {}
        for rank in self._ranks():
            features = self._pipeline(self.families[0], rank)[:FEATURE_STEPS].fit_transform(X, y)
            if any(features.equals(table) for table in tables.values()):
                continue  # e.g. species on a genus-level table: no new choice
            tables[rank] = features
            rows += [{**row, "rank": rank, "params": {"align__rank": rank, **row["params"]}}
                     for family in self.families
                     for row in self._search(family, features, y, groups)]
        self.results_ = pd.DataFrame(rows)
        self.best_ = self.best_of()
        self.model_ = ResponseModel(self._configured(self.best_), seed=self.seed,
                                    threshold=self.threshold,
                                    companion=self._companion(self.best_, tables)
                                    ).fit(X, y, groups)
        self.classes_ = self.model_.classes_
        return self

    def _companion(self, best: pd.Series, tables: dict[str, pd.DataFrame]) -> Pipeline | None:
        """The forest stacked with the chosen configuration (`stack`), on its rank and
        feature set."""
        if not self.stack:
            return None
        rank, blocks = str(best["rank"]), str(best["feature_set"])
        n_features = sum(in_block(str(c), blocks) for c in tables[rank].columns)
        return stacked_forest(self._config(rank), blocks, n_features, self.seed)

    def _ranks(self) -> tuple[str, ...]:
        """Taxonomic ranks the inner CV chooses among: `ranks`, else the preset's."""
        return tuple(self.ranks) if self.ranks else PRESET_RANKS[self.preset]

    def _search(self, family: str, features: pd.DataFrame, y: np.ndarray,
                groups: np.ndarray) -> list[dict[str, Any]]:
        spec = FAMILIES[family]
        form = spec.searched(self.features or FeatureConfig(), self.seed)
        if form.prepare is not None:
            features = form.prepare.fit_transform(features)
        space = [{form.rename.get(k, k): v for k, v in grid.items()}
                 for grid in spec.space(self.preset)]
        n_iter = spec.n_iter.get(self.preset)
        common = {"scoring": self.scoring, "cv": self._cv(), "refit": False, "n_jobs": 1,
                  "error_score": "raise"}
        search = (GridSearchCV(form.head, space, **common) if n_iter is None else
                  RandomizedSearchCV(form.head, space, n_iter=n_iter, random_state=self.seed,
                                     **common))
        search.fit(features, y, groups=groups)
        cv = search.cv_results_
        back = {v: k for k, v in form.rename.items()}
        configurations = [{back.get(k, k): v for k, v in params.items()}
                          for params in cv["params"]]
        return [{"family": family, "feature_set": feature_set(params), "params": params,
                 "inner_score": float(score), "inner_score_sd": float(sd),
                 "complexity": spec.complexity(params), "region": spec.region(params)}
                for params, score, sd in zip(configurations, cv["mean_test_score"],
                                             cv["std_test_score"], strict=True)]

    def best_of(self, family: str | None = None, features: str | None = None) -> pd.Series:
        """The chosen configuration, optionally within a family or feature set.

        `selection="best"` takes the highest mean inner score. `"one_se"` (default) takes,
        within the family, feature set, rank and penalty region of that best configuration,
        the simplest one whose mean is within one standard error of it (glmnet's lambda.1se):
        the maximum over dozens of noisy inner-CV estimates is optimistic, and its
        configuration overfits an independent cohort; among statistically indistinguishable
        choices the simplest generalises best.
        """
        check_is_fitted(self, "results_")
        rows = self.results_
        if family is not None:
            rows = rows[rows["family"] == family]
        if features is not None:
            rows = rows[rows["feature_set"] == features]
        if rows.empty:
            raise ValueError(f"no configuration searched for family={family}, "
                             f"feature set={features}")
        best = rows.loc[rows["inner_score"].idxmax()]
        if self.selection == "best":
            return best
        standard_error = best["inner_score_sd"] / np.sqrt(self.inner_splits)
        close = rows[(rows["family"] == best["family"])
                     & (rows["feature_set"] == best["feature_set"])
                     & (rows["rank"] == best["rank"])
                     & (rows["region"] == best["region"])
                     & (rows["inner_score"] >= best["inner_score"] - standard_error)]
        return close.loc[min(close.index, key=lambda i: close.at[i, "complexity"])]

    def _configured(self, row: pd.Series) -> Pipeline:
        return self._pipeline(str(row["family"]), str(row["rank"])).set_params(**row["params"])

    def refit_best(self, X: pd.DataFrame, y: np.ndarray, family: str | None = None,
                   features: str | None = None) -> Pipeline | None:
        """The best configuration of a family or feature set, refitted (uncalibrated);
        None when that region was not searched."""
        try:
            row = self.best_of(family, features)
        except ValueError:
            return None
        return self._configured(row).fit(X, y)

    def predict_proba(self, X: pd.DataFrame) -> np.ndarray:
        check_is_fitted(self, "model_")
        return self.model_.predict_proba(X)

    def predict(self, X: pd.DataFrame) -> np.ndarray:
        return self.model_.predict(X)
