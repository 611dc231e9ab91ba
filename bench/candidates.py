"""Candidate models that are not the product, scored beside it by `--explore` in
bench_model.py and bench_real.py (docs/benchmarks.md): the next step of the model search is
chosen on these numbers."""

from __future__ import annotations

import numpy as np


def our_forest(seed: int, rank: str = "species") -> object:
    """XGBoost random forest with RF-500's settings (sqrt(p) of ~100 taxa per split,
    unlimited depth, small leaves) on our features at `rank`, recalibrated like every model
    of ours (a `ResponseModel`)."""
    from training.model import FAMILIES, FeatureConfig
    from training.tuning import ResponseModel

    forest = FAMILIES["random_forest"].build(FeatureConfig(rank=rank), seed).set_params(
        model__n_estimators=500, model__max_depth=0, model__grow_policy="lossguide",
        model__min_child_weight=0.1, model__colsample_bynode=0.1, model__reg_lambda=1e-5)
    return ResponseModel(forest, seed=seed)


def blend(ours: np.ndarray, forest: np.ndarray, weight: float = 0.5) -> np.ndarray:
    """Blended recalibrated log-odds: `weight` of ours, the rest the forest's."""
    return weight * ours + (1 - weight) * forest
