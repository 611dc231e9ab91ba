"""Inner cross-validation: choose family, feature set and hyperparameters; then recalibrate.

`ModelSearch` is one scikit-learn estimator that does all the choosing, so the outer loop of
nested CV (training.evaluation) can refit it per fold and the reported score includes the
selection step (no winner's curse). Its fitted `model_` is a `ResponseModel`: the chosen
pipeline plus a logistic recalibration fitted on that pipeline's own out-of-fold predictions,
and the decision threshold chosen on them. That `ResponseModel` is what gets registered and
served.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd
from scipy.special import expit, logit
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_curve
from sklearn.model_selection import (
    GridSearchCV,
    RandomizedSearchCV,
    cross_val_predict,
)
from sklearn.pipeline import Pipeline
from sklearn.utils.validation import check_is_fitted

from training.folds import TreatmentStratifiedGroupKFold
from training.model import DEFAULT_RANKS, FAMILIES, FEATURE_STEPS, FeatureConfig, feature_set

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


def recalibration(y: np.ndarray, p: np.ndarray) -> tuple[float, float]:
    """(intercept, slope) of logit P(y) = a + b logit(p): the affine map in log-odds that
    makes out-of-fold probabilities calibrated. A slope <= 0 means no out-of-fold signal: the
    map collapses to the base rate rather than inverting the ranking."""
    z = logit(np.clip(p, EPS, 1 - EPS)).reshape(-1, 1)
    fit = LogisticRegression(C=np.inf).fit(z, y)
    slope = float(fit.coef_[0, 0])
    if slope <= 0:
        return float(logit(np.clip(np.mean(y), EPS, 1 - EPS))), 0.0
    return float(fit.intercept_[0]), slope


def youden_threshold(y: np.ndarray, p: np.ndarray) -> float:
    """Probability cut-off that maximises sensitivity + specificity - 1."""
    fpr, tpr, thresholds = roc_curve(y, p)
    best = int(np.argmax(tpr - fpr))
    return float(np.clip(thresholds[best], EPS, 1 - EPS))


class ResponseModel(ClassifierMixin, BaseEstimator):
    """A pipeline, recalibrated on its own out-of-fold predictions, with a decision threshold.

    Penalised and tree models trained on a few hundred episodes are over- or under-confident;
    clinicians act on the probability itself. `fit` runs grouped CV of the pipeline on the
    training data, fits logit P(response) = intercept + slope * log-odds on those out-of-fold
    predictions, chooses the threshold (`"youden"` or a fixed probability) on the
    recalibrated ones, and refits the pipeline on all the data. Recalibrated log-odds are
    affine in the pipeline's, so SHAP values rescaled by `slope_` stay exact.

    The map is fitted on fold models but applied to the final one, which saw all the data
    and ranks better: fold models trained on two thirds of it made the map too flat (test
    calibration slope 1.50 at a 95% response rate, up to 1.22 elsewhere; docs/benchmarks.md).
    Five folds (four fifths of the data each) bring those to 0.82-1.13.
    """

    def __init__(self, pipeline: Pipeline, n_splits: int = 5, seed: int = 7,
                 threshold: str | float = "youden") -> None:
        self.pipeline = pipeline
        self.n_splits = n_splits
        self.seed = seed
        self.threshold = threshold

    def fit(self, X: pd.DataFrame, y: np.ndarray, groups: np.ndarray | None = None
            ) -> ResponseModel:
        y = np.asarray(y)
        groups = np.arange(len(y)) if groups is None else np.asarray(groups)
        cv = TreatmentStratifiedGroupKFold(self.n_splits, shuffle=True, random_state=self.seed)
        oof = cross_val_predict(clone(self.pipeline), X, y, groups=groups, cv=cv,
                                method="predict_proba")[:, 1]
        self.intercept_, self.slope_ = recalibration(y, oof)
        calibrated = expit(self.intercept_ + self.slope_ * logit(np.clip(oof, EPS, 1 - EPS)))
        self.threshold_ = (youden_threshold(y, calibrated) if self.threshold == "youden"
                           else float(self.threshold))
        self.pipeline_ = clone(self.pipeline).fit(X, y)
        self.classes_ = self.pipeline_.classes_
        return self

    @property
    def flat(self) -> bool:
        """True when out-of-fold predictions carried (almost) no ranking information."""
        check_is_fitted(self, "slope_")
        return self.slope_ < FLAT_SLOPE

    def decision_function(self, X: pd.DataFrame) -> np.ndarray:
        """Recalibrated log-odds of response."""
        check_is_fitted(self, "pipeline_")
        return self.intercept_ + self.slope_ * margin(self.pipeline_, X)

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
    (`model_`). `results_` holds every configuration's inner score, so the outer loop can also
    refit the best of one feature set or family (`refit_best`) and score it on the same folds.
    """

    def __init__(self, families: tuple[str, ...] = ("linear",),
                 features: FeatureConfig | None = None, preset: str = "fast",
                 inner_splits: int = 3, seed: int = 7, threshold: str | float = "youden",
                 scoring: str = "roc_auc", selection: str = "one_se",
                 ranks: tuple[str, ...] | None = None) -> None:
        self.families = families
        self.features = features
        self.preset = preset
        self.inner_splits = inner_splits
        self.seed = seed
        self.threshold = threshold
        self.scoring = scoring
        self.selection = selection
        self.ranks = ranks

    def _cv(self) -> TreatmentStratifiedGroupKFold:
        return TreatmentStratifiedGroupKFold(self.inner_splits, shuffle=True,
                                             random_state=self.seed)

    def _pipeline(self, family: str) -> Pipeline:
        return FAMILIES[family].build(self.features or FeatureConfig(), self.seed)

    def fit(self, X: pd.DataFrame, y: np.ndarray, groups: np.ndarray | None = None
            ) -> ModelSearch:
        unknown = sorted(set(self.families) - set(FAMILIES))
        if unknown:
            raise ValueError(f"unknown model family {unknown}; choose from {sorted(FAMILIES)}")
        y = np.asarray(y)
        groups = np.arange(len(y)) if groups is None else np.asarray(groups)
        first = self._pipeline(self.families[0])
        rows = []
        for rank in self._ranks():
            features = first[:FEATURE_STEPS].set_params(align__rank=rank).fit_transform(X, y)
            rows += [{**row, "rank": rank, "params": {"align__rank": rank, **row["params"]}}
                     for family in self.families
                     for row in self._search(family, features, y, groups)]
        self.results_ = pd.DataFrame(rows)
        self.best_ = self.best_of()
        self.model_ = ResponseModel(self._configured(self.best_), seed=self.seed,
                                    threshold=self.threshold).fit(X, y, groups)
        self.classes_ = self.model_.classes_
        return self

    def _ranks(self) -> tuple[str, ...]:
        """Taxonomic ranks the inner CV chooses among: `ranks`, else DEFAULT_RANKS."""
        return tuple(self.ranks) if self.ranks else DEFAULT_RANKS

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
        return self._pipeline(str(row["family"])).set_params(**row["params"])

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
