"""Model families and their search spaces: the candidates the inner cross-validation chooses from.

A family is a pipeline from raw inputs to a probability plus, per feature set, the
hyperparameters worth searching. Feature sets are regions of one search space, so the inner
CV picks among clinical-only, microbiome-only and combined models exactly as it picks a
penalty: nothing is chosen by hand or on the folds that estimate performance.

- `linear`: the structured model (training.structure.LinearDesign): log-scaled lab values,
  treatment x marker interactions, and separately weighted clinical and microbiome blocks
  under one lasso or ridge penalty, so taxa enter only when they help out of fold.
- `xgboost`: gradient-boosted trees with depth, learning rate, trees and min_child_weight
  tuned; missing values handled natively, interactions found by the trees.
- `random_forest`: bagged trees (XGBoost's random-forest mode, so its margins are log-odds
  and SHAP stays exact), depth, min_child_weight and features per split tuned.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.pipeline import Pipeline
from sklearn.utils.validation import check_is_fitted
from xgboost import XGBClassifier, XGBRFClassifier

from training.features import feature_steps
from training.structure import BlockWeights, LinearDesign, PenalisedLogistic, in_block

FEATURE_SETS: tuple[str, ...] = ("clinical", "microbiome", "combined")
PRESETS: tuple[str, ...] = ("fast", "thorough")
FEATURE_STEPS = 2  # align + features: label-free, fitted once per training set
# Taxonomic ranks the inner CV chooses among, per preset: species helps on real shotgun data;
# genus and species side by side (`both`) scored about the same on MetAML and the simulator
# at a third more search time (docs/benchmarks.md), so only `thorough` adds it.
# `ModelSearch(ranks=...)` and `itp-train train --rank` override it.
PRESET_RANKS: dict[str, tuple[str, ...]] = {"fast": ("genus", "species"),
                                            "thorough": ("genus", "species", "both")}


@dataclass(frozen=True)
class FeatureConfig:
    """Preprocessing parameters, frozen into the fitted pipeline."""

    rank: str = "genus"
    min_prevalence: float = 0.1
    min_abundance: float = 1e-4
    pseudocount: float = 1e-5
    missing_indicators: bool = False


class FeatureBlocks(TransformerMixin, BaseEstimator):
    """Keeps the columns of one feature set: `clinical` (treatment + clinical and immune data),
    `microbiome` (treatment + taxa + diversity) or `combined` (all).

    Treatment stays in every set: the model predicts response to one treatment, and response
    rates differ by treatment, so a set without it would measure the treatment mix instead.
    """

    def __init__(self, blocks: str = "combined") -> None:
        self.blocks = blocks

    def fit(self, X: pd.DataFrame, y: object = None) -> FeatureBlocks:
        if self.blocks not in FEATURE_SETS:
            raise ValueError(f"blocks must be one of {FEATURE_SETS}, got {self.blocks!r}")
        self.feature_names_in_ = np.asarray(X.columns, dtype=object)
        self.n_features_in_ = X.shape[1]
        self.support_ = np.array([in_block(str(c), self.blocks) for c in X.columns])
        return self

    def transform(self, X: pd.DataFrame) -> pd.DataFrame:
        check_is_fitted(self, "support_")
        return X.loc[:, self.support_]

    def get_feature_names_out(self, input_features: object = None) -> np.ndarray:
        check_is_fitted(self, "support_")
        return self.feature_names_in_[self.support_]


def _features(config: FeatureConfig) -> list[tuple[str, Any]]:
    steps = feature_steps(config.rank, config.min_prevalence, config.min_abundance,
                          config.pseudocount)
    steps[-1][1].set_output(transform="pandas")  # later steps select blocks by column name
    return steps


def _linear(config: FeatureConfig, seed: int) -> Pipeline:
    return Pipeline([
        *_features(config),
        ("blocks", FeatureBlocks()),
        ("design", LinearDesign(missing_indicators=config.missing_indicators)),
        ("model", PenalisedLogistic(alpha=0.02, random_state=seed)),
    ])


@dataclass(frozen=True)
class SearchForm:
    """How the inner search fits a family: `prepare` (label-free, or None) is fitted once on
    the features of each training set, `head` is what each configuration fits per inner fold,
    and `rename` maps the family's parameter names to the head's. Scores equal those of the
    family's own pipeline up to where the label-free statistics are estimated."""

    head: Pipeline
    prepare: TransformerMixin | None = None
    rename: dict[str, str] = field(default_factory=dict)


def _linear_search(config: FeatureConfig, seed: int) -> SearchForm:
    # The design (imputation, log scales, interactions, standardisation) is label-free and
    # the same for every configuration up to a column subset and scaling (BlockWeights).
    # Fitting it once per training set, not per configuration and fold, cuts the search by
    # about 40% (9.4 s -> 5.3 s on 400 patients, profiled).
    design = LinearDesign(microbiome=1.0, interactions=1.0, treatment=1.0,
                          missing_indicators=config.missing_indicators)
    return SearchForm(
        head=Pipeline([("weights", BlockWeights()),
                       ("model", PenalisedLogistic(random_state=seed))]),
        prepare=design.set_output(transform="pandas"),
        rename={"blocks__blocks": "weights__blocks", "design__microbiome": "weights__microbiome",
                "design__interactions": "weights__interactions"},
    )


def _xgboost(config: FeatureConfig, seed: int) -> Pipeline:
    # 64 histogram bins: same CV AUROC and Brier as the default 256 on the demo cohorts
    # (docs/benchmarks.md), at half the fitting time. One thread: folds run in parallel.
    return Pipeline([
        *_features(config),
        ("blocks", FeatureBlocks()),
        ("to_array", _ToArray()),
        ("model", XGBClassifier(n_estimators=200, learning_rate=0.05, max_depth=3,
                                min_child_weight=3, subsample=0.8, colsample_bytree=0.5,
                                tree_method="hist", max_bin=64, n_jobs=1,
                                random_state=seed)),
    ])


def _random_forest(config: FeatureConfig, seed: int) -> Pipeline:
    # XGBoost's random-forest mode: bagged trees, one round, margins in log-odds, so the
    # exact TreeSHAP values add up to the served log-odds like every other family's.
    return Pipeline([
        *_features(config),
        ("blocks", FeatureBlocks()),
        ("to_array", _ToArray()),
        ("model", XGBRFClassifier(n_estimators=300, max_depth=6, min_child_weight=1,
                                  subsample=0.632, colsample_bynode=0.5, tree_method="hist",
                                  max_bin=64, n_jobs=1, random_state=seed)),
    ])


def stacked_forest(config: FeatureConfig, blocks: str, n_features: int, seed: int
                   ) -> Pipeline:
    """The random forest stacked with the chosen model (`ResponseModel`'s companion), on the
    same feature set: trees find thresholds and interactions the linear design does not
    spell out, and averaging in log-odds cancels part of each model's error.

    Fixed, not tuned: its weight in the stack is what the out-of-fold fit decides (zero
    drops it). sqrt(p) features per split (Breiman's default), 200 trees of depth 4, small
    leaves. On the simulator (8 scenarios x 3 seeds, docs/benchmarks.md) this forest stacked
    with the linear search narrowed the mean gap to the oracle from 0.049 to 0.043, within
    0.001 of 500 unlimited-depth trees, at a seventh of their cost (0.16 s against 1.16 s
    per fit on 400 patients).
    """
    return _random_forest(config, seed).set_params(
        blocks__blocks=blocks, model__n_estimators=200, model__max_depth=4,
        model__min_child_weight=0.1, model__reg_lambda=1e-5,
        model__colsample_bynode=min(1.0, 1 / np.sqrt(max(n_features, 1))))


class _ToArray(TransformerMixin, BaseEstimator):
    """DataFrame -> float array, so XGBoost never sees lineage strings as column names."""

    def fit(self, X: pd.DataFrame, y: object = None) -> _ToArray:
        self.feature_names_in_ = np.asarray(X.columns, dtype=object)
        self.n_features_in_ = X.shape[1]
        return self

    def transform(self, X: pd.DataFrame) -> np.ndarray:
        return np.asarray(X, dtype=float)

    def get_feature_names_out(self, input_features: object = None) -> np.ndarray:
        return self.feature_names_in_


def _linear_space(preset: str) -> list[dict[str, list[Any]]]:
    """Penalty regions. Lasso (alpha per episode 0.007-0.07: "most markers in" to "a
    handful") suits a few strong predictors; ridge (0.1-1) suits signal spread thinly over
    many correlated taxa, as on real metagenomes, where a lasso keeps one taxon of a group and
    random forests beat it (docs/benchmarks.md). `thorough` adds the elastic net in between
    (an even mix, on a coarser grid: its saga solver is 3-10x slower than liblinear). Inner
    CV chooses among them."""
    if preset == "fast":
        lasso, ridge = [0.06, 0.02, 0.007], [1.0, 0.3, 0.1]
        microbiome, interactions = [0.25, 0.5, 1.0], [0.0, 0.5]
        regions = [(1.0, lasso, microbiome, interactions),
                   (0.0, ridge, [0.5, 1.0], interactions)]
    else:
        lasso = list(np.round(np.geomspace(0.1, 0.003, 7), 4))
        ridge = list(np.round(np.geomspace(3.0, 0.03, 5), 4))
        elastic_net = list(np.round(np.geomspace(0.1, 0.01, 4), 4))
        microbiome, interactions = [0.1, 0.25, 0.5, 1.0], [0.0, 0.25, 0.5, 1.0]
        regions = [(1.0, lasso, microbiome, interactions),
                   (0.0, ridge, microbiome, interactions),
                   (0.5, elastic_net, [0.25, 0.5, 1.0], [0.0, 0.5])]
    space = []
    for l1_ratio, alpha, weights, products in regions:
        penalty = {"model__l1_ratio": [l1_ratio], "model__alpha": alpha}
        space += [
            {"blocks__blocks": ["combined"], **penalty, "design__microbiome": weights,
             "design__interactions": products},
            {"blocks__blocks": ["clinical"], **penalty, "design__interactions": products},
            {"blocks__blocks": ["microbiome"], **penalty, "design__interactions": [0.0]},
        ]
    return space


def _xgboost_space(preset: str) -> list[dict[str, list[Any]]]:
    space = {
        "model__max_depth": [1, 2, 3, 4],
        "model__learning_rate": [0.02, 0.05, 0.1],
        "model__n_estimators": [100, 200, 400],
        "model__min_child_weight": [1, 3, 6],
    }
    sets = ["clinical", "combined"] if preset == "fast" else list(FEATURE_SETS)
    return [{"blocks__blocks": [s], **space} for s in sets]


def _random_forest_space(preset: str) -> list[dict[str, list[Any]]]:
    space = {
        "model__max_depth": [3, 5, 8],
        "model__min_child_weight": [1, 3, 6],
        "model__colsample_bynode": [0.2, 0.5],
    }
    sets = ["clinical", "combined"] if preset == "fast" else list(FEATURE_SETS)
    return [{"blocks__blocks": [s], **space} for s in sets]


def _random_forest_complexity(params: dict[str, Any]) -> tuple[float, ...]:
    return (params.get("model__max_depth", 6), -params.get("model__min_child_weight", 1),
            params.get("model__colsample_bynode", 0.5))


def _linear_complexity(params: dict[str, Any]) -> tuple[float, ...]:
    """Weaker penalty (smaller alpha), heavier blocks: more effective parameters."""
    return (-params.get("model__alpha", 0.0), params.get("design__microbiome", 0.0),
            params.get("design__interactions", 0.0))


def _linear_region(params: dict[str, Any]) -> str:
    """Lasso, ridge and elastic-net penalties are not on one scale of complexity: the
    one-standard-error rule compares configurations within one penalty only."""
    l1_ratio = params.get("model__l1_ratio", 1.0)
    return {1.0: "lasso", 0.0: "ridge"}.get(l1_ratio, "elastic-net")


def _xgboost_complexity(params: dict[str, Any]) -> tuple[float, ...]:
    return (params.get("model__max_depth", 3),
            params.get("model__n_estimators", 100) * params.get("model__learning_rate", 0.1),
            -params.get("model__min_child_weight", 1))


@dataclass(frozen=True)
class Family:
    name: str
    description: str
    build: Callable[[FeatureConfig, int], Pipeline] = field(repr=False)
    space: Callable[[str], list[dict[str, list[Any]]]] = field(repr=False)
    # Configurations sampled per preset; None searches the whole grid.
    n_iter: dict[str, int | None] = field(default_factory=dict)
    # Sort key, simplest first: the one-standard-error rule picks the simplest configuration
    # whose inner score is within one standard error of the best.
    complexity: Callable[[dict[str, Any]], tuple[float, ...]] = field(
        default=_linear_complexity, repr=False)
    # Configurations whose complexities are comparable share a region (for the one-SE rule).
    region: Callable[[dict[str, Any]], str] = field(default=lambda params: "", repr=False)
    # A cheaper equivalent form for the inner search; None: the pipeline after its
    # label-free feature steps.
    search_form: Callable[[FeatureConfig, int], SearchForm] | None = field(default=None,
                                                                         repr=False)

    def searched(self, config: FeatureConfig, seed: int) -> SearchForm:
        if self.search_form is not None:
            return self.search_form(config, seed)
        return SearchForm(head=self.build(config, seed)[FEATURE_STEPS:])


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("linear", "Block-penalised logistic regression (lasso or ridge, and in "
               "thorough elastic net, chosen in inner CV): log-scaled labs, treatment x "
               "marker interactions, clinical and microbiome blocks weighted apart.",
               _linear, _linear_space, {"fast": None, "thorough": None}, _linear_complexity,
               _linear_region, _linear_search),
        Family("xgboost", "Gradient-boosted trees (XGBoost), depth, learning rate, trees and "
               "min_child_weight tuned; missing values native.",
               _xgboost, _xgboost_space, {"fast": 6, "thorough": 24}, _xgboost_complexity),
        Family("random_forest", "Random forest (XGBoost's random-forest mode: 300 bagged "
               "trees, margins in log-odds for exact SHAP), depth, min_child_weight and "
               "features per split tuned.",
               _random_forest, _random_forest_space, {"fast": 6, "thorough": 12},
               _random_forest_complexity),
    )
}

DEFAULT_FAMILIES: dict[str, tuple[str, ...]] = {
    "fast": ("linear",),
    "thorough": ("linear", "xgboost", "random_forest"),
}


def feature_set(params: dict[str, Any]) -> str:
    """The feature set a configuration of any family uses."""
    return str(params.get("blocks__blocks", "combined"))
