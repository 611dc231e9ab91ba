"""Patient-grouped folds, stratified by treatment and outcome.

Response rates differ several-fold between treatments (docs/evaluation.md), and a model
cannot score a treatment that its training fold never saw. Stratifying on the outcome alone
lets a treatment with a handful of patients fall wholly into one test fold; stratifying on
treatment x outcome spreads each treatment's patients, responders and non-responders over
the folds, in the outer and the inner loops alike. Patients stay whole (grouped).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from training.schema import TREATMENT


def strata(X: object, y: np.ndarray) -> np.ndarray:
    """treatment|outcome labels when X carries the treatment, else the outcome."""
    y = np.asarray(y)
    if isinstance(X, pd.DataFrame) and TREATMENT in X.columns:
        return (X[TREATMENT].astype(str).to_numpy(dtype=object) + "|"
                + y.astype(str).astype(object))
    return y


class TreatmentStratifiedGroupKFold(StratifiedGroupKFold):
    """StratifiedGroupKFold on treatment x outcome; a drop-in `cv=` for scikit-learn's
    searches and `cross_val_predict` (they pass X, y and groups to `split`)."""

    def split(self, X: object, y: np.ndarray | None = None, groups: object = None
              ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        labels = strata(X, y) if y is not None else y
        with warnings.catch_warnings():
            # a rare treatment has fewer patients per outcome than folds: expected, and
            # the greedy assignment still spreads them as far as they go
            warnings.filterwarnings("ignore", message="The least populated class")
            folds = list(super().split(X, labels, groups))
        yield from folds
