"""Candidate models: the shared feature steps followed by one estimator each.

Hyperparameters are fixed, conservative defaults for cohorts of a few hundred episodes
rather than tuned: with no inner search there is nothing to leak, and the comparison between
candidates is the only selection made on the cross-validation folds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from xgboost import XGBClassifier

from training.features import feature_steps


@dataclass(frozen=True)
class FeatureConfig:
    """Preprocessing parameters, frozen into the fitted pipeline."""

    rank: str = "genus"
    min_prevalence: float = 0.1
    min_abundance: float = 1e-4
    pseudocount: float = 1e-5


def _xgboost(seed: int) -> list[tuple[str, object]]:
    # Shallow trees, strong subsampling: a few hundred samples overfit deeper boosters.
    # 64 histogram bins: same CV AUROC and Brier as the default 256 on the demo cohorts
    # (docs/benchmarks.md), at half the fitting time.
    return [
        (
            "model",
            XGBClassifier(
                n_estimators=300,
                learning_rate=0.03,
                max_depth=3,
                min_child_weight=3,
                subsample=0.8,
                colsample_bytree=0.5,
                reg_lambda=1.0,
                tree_method="hist",
                max_bin=64,
                n_jobs=1,
                random_state=seed,
            ),
        )
    ]


def _logistic(seed: int) -> list[tuple[str, object]]:
    # Elastic net on standardised features, as SIAMCAT does: sparse but stable with
    # correlated taxa. Imputation and scaling sit in the pipeline, so they are refitted per fold.
    return [
        ("impute", SimpleImputer(strategy="median", add_indicator=True, keep_empty_features=True)),
        ("scale", StandardScaler()),
        (
            "model",
            LogisticRegression(
                solver="saga", l1_ratio=0.5, C=0.1, max_iter=5000, random_state=seed
            ),
        ),
    ]


@dataclass(frozen=True)
class Candidate:
    name: str
    description: str
    estimator_steps: Callable[[int], list[tuple[str, object]]] = field(repr=False)

    def build(self, features: FeatureConfig, seed: int) -> Pipeline:
        """A fresh, unfitted pipeline from raw inputs to a probability of response."""
        steps = feature_steps(
            features.rank, features.min_prevalence, features.min_abundance, features.pseudocount
        )
        return Pipeline([*steps, *self.estimator_steps(seed)])


CANDIDATES: dict[str, Candidate] = {
    c.name: c
    for c in (
        Candidate("xgboost", "Gradient-boosted trees (XGBoost), missing values native.", _xgboost),
        Candidate("logistic", "Elastic-net logistic regression on standardised features.",
                  _logistic),
    )
}
