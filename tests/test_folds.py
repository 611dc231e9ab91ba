"""Folds stratified by treatment x outcome keep a rare treatment in every training fold."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.model_selection import StratifiedGroupKFold

from training.evaluation import CVConfig, grouped_splits
from training.folds import TreatmentStratifiedGroupKFold
from training.schema import TREATMENT


def _rare_treatment_cohort(seed: int) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """120 patients on two common treatments, 5 on a rare one; 1-2 episodes each."""
    rng = np.random.default_rng(seed)
    treatments = ["corticosteroid"] * 60 + ["ivig"] * 60 + ["tpo_ra"] * 5
    episodes = rng.integers(1, 3, size=len(treatments))
    groups = np.repeat(np.arange(len(treatments)), episodes)
    X = pd.DataFrame({TREATMENT: np.repeat(treatments, episodes)})
    y = (rng.random(len(groups)) < 0.5).astype(int)
    return X, y, groups


def _rare_missing_from_a_training_fold(X: pd.DataFrame, y: np.ndarray, groups: np.ndarray,
                                       outer: object, inner: object) -> bool:
    """Does any outer training fold, or any inner training fold within one, lack tpo_ra?"""
    for train, _ in outer.split(X, y, groups):
        if "tpo_ra" not in set(X[TREATMENT].iloc[train]):
            return True
        X_in, y_in, g_in = X.iloc[train], y[train], groups[train]
        if any("tpo_ra" not in set(X_in[TREATMENT].iloc[t]) for t, _ in
               inner.split(X_in, y_in, g_in)):
            return True
    return False


def test_a_rare_treatment_is_in_every_outer_and_inner_training_fold() -> None:
    treatment_strata = [
        _rare_missing_from_a_training_fold(
            *_rare_treatment_cohort(seed),
            TreatmentStratifiedGroupKFold(5, shuffle=True, random_state=seed),
            TreatmentStratifiedGroupKFold(3, shuffle=True, random_state=seed))
        for seed in range(30)]
    outcome_strata = [
        _rare_missing_from_a_training_fold(
            *_rare_treatment_cohort(seed),
            StratifiedGroupKFold(5, shuffle=True, random_state=seed),
            StratifiedGroupKFold(3, shuffle=True, random_state=seed))
        for seed in range(30)]
    assert not any(treatment_strata)
    assert any(outcome_strata)  # control: stratifying on the outcome alone loses it


@pytest.mark.parametrize("seed", [0, 1])
def test_outer_splits_stay_grouped_and_balance_each_treatment(seed: int) -> None:
    X, y, groups = _rare_treatment_cohort(seed)
    config = CVConfig(n_splits=5, n_repeats=2, seed=seed)
    for _, train, test in grouped_splits(y, groups, config, X):
        assert not set(groups[train]) & set(groups[test])
        per_fold = X[TREATMENT].iloc[test].value_counts()
        assert per_fold.get("tpo_ra", 0) <= 2  # 5 patients spread over 5 folds
        assert 0.2 < y[test].mean() < 0.8
