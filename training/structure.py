"""Model structure that fits the domain: log scales, treatment-specific effects, penalty blocks.

The known predictors of ITP response act per treatment (endogenous TPO for TPO-RAs, anti-GPIb
for IVIG, IPF for steroids), lab values are log-normal, and a profile has a few hundred weak,
compositional taxa next to a dozen strong clinical markers. These transformers sit between
the shared feature steps and a penalised linear model and give it that structure; each is a
plain scikit-learn transformer, so the tuner can switch any of them in or out per fold.

Column naming is the contract that lets every SHAP value map back to one input field:
`<field>|<treatment column>` is the interaction of a field with a treatment, and
`missingindicator_<field>` the missing-value flag of a field (`source_feature`).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from sklearn.utils.validation import check_is_fitted

from training import schema

TREATMENT_PREFIX = "treatment="
INTERACTION = "|"
MISSING_PREFIX = "missingindicator_"
DIVERSITY = ("shannon_diversity", "observed_genera")
TREATMENT_WEIGHT = 10.0  # penalty factor 0.1: treatment indicators stratify (LinearDesign)


def source_feature(column: str) -> str:
    """The input field a design column is computed from (interactions, indicators included)."""
    return str(column).removeprefix(MISSING_PREFIX).split(INTERACTION, 1)[0]


def is_microbiome(column: str) -> bool:
    name = source_feature(column)
    return schema.is_taxon(name) or name in DIVERSITY


def is_treatment(column: str) -> bool:
    return str(column).startswith(TREATMENT_PREFIX)


def in_block(column: str, blocks: str) -> bool:
    """Whether a column belongs to a feature set: `clinical` (treatment + clinical and immune
    data, their interactions and indicators), `microbiome` (treatment + taxa + diversity) or
    `combined` (all). Treatment is in every set: response rates differ by treatment."""
    if blocks == "combined" or is_treatment(column):
        return True
    return is_microbiome(column) == (blocks == "microbiome")


def block_weight(column: str, microbiome: float, interactions: float, treatment: float
                 ) -> float:
    """A design column's penalty weight (see LinearDesign)."""
    if is_treatment(column):
        return treatment
    if is_microbiome(column):
        return microbiome
    if INTERACTION in column:
        return interactions
    return 1.0


class LinearDesign(TransformerMixin, BaseEstimator):
    """Named features -> the design matrix of a block-penalised linear model.

    In order: median imputation (with missing-value indicators only when asked: a randomly
    missing marker carries no signal, and its indicator only adds noise to explanations),
    ln(1 + x) of right-skewed lab values (effects are reported per doubling, not per pg/mL),
    field x treatment interactions, standardisation, and block weights.

    Interactions let a marker matter for one treatment and not another (endogenous TPO for
    TPO-RAs, anti-GPIb for IVIG, IPF for steroids). Fields are centred at their training mean
    before multiplying, so an interaction is the marker's deviation within that treatment;
    only treatments with at least `min_episodes` training episodes get them.

    Block weights multiply standardised columns: under an L1 or L2 penalty a column scaled by
    w costs 1/w as much per unit of effect, so a weight is a penalty factor (glmnet's
    `penalty.factor`). Tuning the microbiome weight in inner CV lets hundreds of weak taxa
    enter only when they help out of fold; weight 0 removes a block.

    Treatment indicators get weight `treatment` (10: almost unpenalised, glmnet's penalty
    factor 0.1): they stratify the model by treatment, whose response rates differ by design,
    rather than being candidates for selection. Shrinking them pulls every treatment towards
    the pooled rate and leaves the markers to explain the difference (measured: 0.006 AUROC
    closer to the simulator's oracle, docs/benchmarks.md).

    Input must be a DataFrame (column names decide the blocks); output is a float array.
    """

    def __init__(self, microbiome: float = 1.0, interactions: float = 1.0,
                 log_scale: bool = True, missing_indicators: bool = False,
                 min_episodes: int = 25, treatment: float = TREATMENT_WEIGHT) -> None:
        self.microbiome = microbiome
        self.interactions = interactions
        self.log_scale = log_scale
        self.missing_indicators = missing_indicators
        self.min_episodes = min_episodes
        self.treatment = treatment

    def fit(self, X: pd.DataFrame, y: object = None) -> LinearDesign:
        if not isinstance(X, pd.DataFrame):
            raise TypeError("LinearDesign needs a DataFrame: column names define the blocks")
        self.feature_names_in_ = np.asarray(X.columns, dtype=object)
        self.n_features_in_ = X.shape[1]
        names = [str(c) for c in X.columns]
        values = X.to_numpy(dtype=float)
        self.imputer_ = SimpleImputer(strategy="median", keep_empty_features=True,
                                      add_indicator=self.missing_indicators).fit(values)
        self.log_columns_ = np.array([self.log_scale and n in schema.LOG_SCALE_FIELDS
                                      for n in names])
        base = self._logged(self.imputer_.transform(values)[:, : len(names)])
        counts = {n: values[:, i].sum() for i, n in enumerate(names) if is_treatment(n)}
        self.treatments_ = [n for n, c in counts.items() if c >= self.min_episodes]
        self.fields_ = [i for i, n in enumerate(names)
                        if not is_treatment(n) and not is_microbiome(n)]
        self.centers_ = base[:, self.fields_].mean(axis=0)
        design = self._design(values)
        self.scaler_ = StandardScaler().fit(design)
        self.weights_ = np.array([block_weight(n, self.microbiome, self.interactions,
                                               self.treatment) for n in self._names()])
        return self

    def _logged(self, values: np.ndarray) -> np.ndarray:
        values = values.copy()
        values[:, self.log_columns_] = np.log1p(np.clip(values[:, self.log_columns_], 0, None))
        return values

    def _design(self, values: np.ndarray) -> np.ndarray:
        n = self.n_features_in_
        imputed = self.imputer_.transform(values)
        base = self._logged(imputed[:, :n])
        position = {str(c): i for i, c in enumerate(self.feature_names_in_)}
        centred = base[:, self.fields_] - self.centers_
        products = [centred * values[:, [position[t]]] for t in self.treatments_]
        return np.hstack([base, *products, imputed[:, n:]])

    def _names(self) -> list[str]:
        names = [str(c) for c in self.feature_names_in_]
        products = [f"{names[i]}{INTERACTION}{t}" for t in self.treatments_ for i in self.fields_]
        indicators = [f"{MISSING_PREFIX}{names[i]}" for i in self.imputer_.indicator_.features_
                      ] if self.missing_indicators else []
        return [*names, *products, *indicators]

    def transform(self, X: pd.DataFrame) -> np.ndarray:
        check_is_fitted(self, "weights_")
        values = X.to_numpy(dtype=float) if isinstance(X, pd.DataFrame) else np.asarray(
            X, dtype=float)
        return self.scaler_.transform(self._design(values)) * self.weights_

    def unscale(self, design: np.ndarray) -> np.ndarray:
        """Design values back in their own units (before weights and standardisation)."""
        check_is_fitted(self, "weights_")
        safe = np.where(self.weights_ == 0, 1.0, self.weights_)
        return self.scaler_.inverse_transform(design / safe)

    def get_feature_names_out(self, input_features: object = None) -> np.ndarray:
        check_is_fitted(self, "weights_")
        return np.asarray(self._names(), dtype=object)


class BlockWeights(TransformerMixin, BaseEstimator):
    """Feature-set selection and block weights applied to an unweighted design (a
    `LinearDesign` with every weight 1, as a DataFrame): the inner search's cheap equivalent
    of FeatureBlocks + LinearDesign.

    A design's columns are standardised one by one, and a feature set only drops columns
    (clinical fields interact with treatments, taxa with nothing), so the design of any
    feature set is a column subset of the combined design, and any block weighting is a
    column scaling of it. The search therefore fits the label-free design once per training
    set instead of once per configuration and fold; the served pipeline keeps the
    FeatureBlocks + LinearDesign form. Parameters mirror theirs.
    """

    def __init__(self, blocks: str = "combined", microbiome: float = 1.0,
                 interactions: float = 1.0, treatment: float = TREATMENT_WEIGHT) -> None:
        self.blocks = blocks
        self.microbiome = microbiome
        self.interactions = interactions
        self.treatment = treatment

    def fit(self, X: pd.DataFrame, y: object = None) -> BlockWeights:
        if not isinstance(X, pd.DataFrame):
            raise TypeError("BlockWeights needs a DataFrame: column names define the blocks")
        self.feature_names_in_ = np.asarray(X.columns, dtype=object)
        self.n_features_in_ = X.shape[1]
        names = [str(c) for c in X.columns]
        self.support_ = np.array([in_block(n, self.blocks) for n in names])
        self.weights_ = np.array([block_weight(n, self.microbiome, self.interactions,
                                               self.treatment)
                                  for n, kept in zip(names, self.support_, strict=True) if kept])
        return self

    def transform(self, X: pd.DataFrame) -> np.ndarray:
        check_is_fitted(self, "weights_")
        values = X.to_numpy(dtype=float) if isinstance(X, pd.DataFrame) else np.asarray(
            X, dtype=float)
        return values[:, self.support_] * self.weights_

    def get_feature_names_out(self, input_features: object = None) -> np.ndarray:
        check_is_fitted(self, "support_")
        return self.feature_names_in_[self.support_]


class PenalisedLogistic(LogisticRegression):
    """Lasso (`l1_ratio=1`), ridge (`l1_ratio=0`) or elastic-net (in between) logistic
    regression whose penalty is per episode: glmnet's lambda.

    scikit-learn's C weighs the *sum* of the losses, so one C penalises a model fitted on the
    whole cohort less than the same C on the two-thirds of it an inner fold sees: the final
    model comes out less shrunk, and more overconfident, than the one that was tuned and
    recalibrated. With C = 1 / (alpha * n) the shrinkage means the same at every size.

    The solver follows the penalty, as C follows alpha: liblinear for lasso and ridge (exact
    and fastest there), saga for a mixed penalty, the only solver that has one. liblinear
    penalises the intercept like a coefficient (on a constant column of `intercept_scaling`):
    at alpha = 0.06 that pulls the mean prediction 0.06 towards 50%. A constant of 100 makes
    that penalty negligible, as glmnet (and saga) never penalise it.
    """

    def __init__(self, alpha: float = 0.02, l1_ratio: float = 1.0, max_iter: int = 1000,
                 random_state: int | None = None, intercept_scaling: float = 100.0) -> None:
        super().__init__(l1_ratio=l1_ratio, max_iter=max_iter, random_state=random_state,
                         intercept_scaling=intercept_scaling)
        self.alpha = alpha

    def fit(self, X: np.ndarray, y: np.ndarray, sample_weight: np.ndarray | None = None
            ) -> PenalisedLogistic:
        self.C = 1.0 / (self.alpha * len(y))
        self.solver = "liblinear" if self.l1_ratio in (0.0, 1.0) else "saga"
        return super().fit(X, y, sample_weight)
