"""Patient-grouped folds, stratified by outcome, and by treatment where a treatment is rare.

A model cannot score a treatment that its training fold never saw. Stratifying on the
outcome alone lets a treatment with a handful of patients fall wholly into one test fold; so
a rare treatment (fewer than `RARE_PER_FOLD` episodes per fold) gets strata of its own,
which spread its patients, responders and non-responders over the folds, in the outer and
the inner loops alike.

Common treatments share one stratum per outcome. Stratifying them on treatment x outcome
too would copy the cohort's chance association of treatment and outcome into every test
fold, and a model that learns per-treatment response rates would be rewarded for it: under
permuted labels the nested CV AUROC came out 0.532 (5 null cohorts) against 0.502 with
common treatments pooled (docs/benchmarks.md). Patients stay whole (grouped).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from training.schema import TREATMENT

RARE_PER_FOLD = 10  # episodes per fold below which a treatment is stratified on its own
COMMON = "common"


def strata(X: object, y: np.ndarray, n_splits: int) -> np.ndarray:
    """Outcome labels, prefixed by the treatment for rare treatments (and by "common" for
    the others) when X carries the treatment."""
    y = np.asarray(y)
    if not (isinstance(X, pd.DataFrame) and TREATMENT in X.columns):
        return y
    treatment = X[TREATMENT].astype(str)
    rare = treatment.map(treatment.value_counts()).to_numpy() < RARE_PER_FOLD * n_splits
    prefix = np.where(rare, treatment.to_numpy(dtype=object), COMMON).astype(object)
    return prefix + "|" + y.astype(str).astype(object)


class TreatmentStratifiedGroupKFold(StratifiedGroupKFold):
    """StratifiedGroupKFold on outcome, with rare treatments stratified apart; a drop-in
    `cv=` for scikit-learn's searches and `cross_val_predict` (they pass X, y and groups to
    `split`)."""

    def split(self, X: object, y: np.ndarray | None = None, groups: object = None
              ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        labels = strata(X, y, self.n_splits) if y is not None else y
        with warnings.catch_warnings():
            # a rare treatment has fewer patients per outcome than folds: expected, and
            # the greedy assignment still spreads them as far as they go
            warnings.filterwarnings("ignore", message="The least populated class")
            folds = list(super().split(X, labels, groups))
        yield from folds
