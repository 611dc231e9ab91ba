"""Performance per subgroup (treatment, sex, age band): where a model may fail quietly.

TRIPOD+AI asks for performance in the groups a model will be used on; a pooled AUROC can
hide a treatment whose responders it cannot tell apart, or an age band it over-predicts.
"""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from training.evaluation import calibration
from training.schema import TREATMENT

AGE_BANDS: tuple[float, ...] = (0, 40, 65, np.inf)  # <40, 40-64, >=65 years
MIN_SUBGROUP = 10  # smaller subgroups are listed with counts only


def age_band(age: pd.Series) -> pd.Series:
    labels = [f"{int(lo)}-{int(hi) - 1}" if np.isfinite(hi) else f">={int(lo)}"
              for lo, hi in itertools.pairwise(AGE_BANDS)]
    return pd.cut(age, AGE_BANDS, right=False, labels=labels).astype(object)


def subgroup_table(metadata: pd.DataFrame, y: np.ndarray, p: np.ndarray) -> pd.DataFrame:
    """Per treatment, sex and age band: size, events, observed vs mean predicted response,
    AUROC and calibration-in-the-large where the subgroup holds both outcomes."""
    groupings = {"treatment": metadata[TREATMENT], "sex": metadata["sex"],
                 "age_band": age_band(metadata["age_years"])}
    rows = []
    for variable, values in groupings.items():
        for level in values.dropna().unique():
            mask = (values == level).to_numpy()
            ys, ps = y[mask], p[mask]
            both = 0 < ys.sum() < len(ys)
            scored = both and len(ys) >= MIN_SUBGROUP
            rows.append({
                "variable": variable, "level": str(level), "n": int(mask.sum()),
                "responders": int(ys.sum()), "observed_rate": float(ys.mean()),
                "mean_predicted": float(ps.mean()),
                "auroc": float(roc_auc_score(ys, ps)) if scored else np.nan,
                "calibration_in_the_large": (calibration(ys, ps)["calibration_in_the_large"]
                                             if scored else np.nan)})
    return pd.DataFrame(rows).sort_values(["variable", "level"], ignore_index=True)
