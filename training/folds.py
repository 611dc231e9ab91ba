"""Patient-grouped folds, stratified by outcome, and by treatment where a treatment is rare.

A model cannot score a treatment that its training fold never saw. Stratifying on the
outcome alone lets a treatment with a handful of patients fall wholly into one test fold; so
a rare treatment (fewer than `RARE_PER_FOLD` episodes per fold) is a stratum of its own,
which spreads its patients over the folds, in the outer and the inner loops alike. Common
treatments share one stratum per outcome.

No treatment is stratified on treatment x outcome: that copies the cohort's chance
association of treatment and outcome into every test fold, and a model that learns
per-treatment response rates is rewarded for it. Null cohorts scored a nested CV AUROC of
0.532 with every treatment so stratified (5 cohorts), 0.502 with common treatments pooled,
0.481 with these folds (held-out rates run slightly against the training ones);
a per-treatment-rate model on noise labels 0.550, 0.527 with only the rare treatments so
stratified, 0.490 with these folds (tests/test_folds.py). Patients stay whole (grouped).
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
    """When X carries the treatment: the treatment for rare treatments, "common|<outcome>"
    for the others; else the outcome."""
    y = np.asarray(y)
    if not (isinstance(X, pd.DataFrame) and TREATMENT in X.columns):
        return y
    treatment = X[TREATMENT].astype(str)
    rare = treatment.map(treatment.value_counts()).to_numpy() < RARE_PER_FOLD * n_splits
    common = COMMON + "|" + y.astype(str).astype(object)
    return np.where(rare, treatment.to_numpy(dtype=object), common).astype(object)


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
