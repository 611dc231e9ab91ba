"""Small seeded synthetic cohorts for the feature, evaluation and explanation tests.

Everything goes through `training.features.model_input`, so the frames have exactly the
columns and dtypes the pipelines see in production.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from training.features import model_input

GENERA: tuple[str, ...] = tuple(
    f"d__Bacteria;p__Firmicutes;c__Clostridia;o__Eubacteriales;f__Family{i % 4};g__Genus{i}"
    for i in range(12)
)
TREATMENTS: tuple[str, ...] = ("corticosteroid", "ivig", "tpo_ra")


def sample_index(n: int, prefix: str = "S") -> pd.Index:
    return pd.Index([f"{prefix}{i}" for i in range(n)], name="sample-id")


def counts_frame(
    n: int,
    seed: int,
    taxa: Sequence[str] = GENERA,
    index: pd.Index | None = None,
) -> pd.DataFrame:
    """Multinomial reads from sparse gamma weights; the first taxon is never absent."""
    rng = np.random.default_rng(seed)
    weights = rng.gamma(0.6, 1.0, size=(n, len(taxa)))
    weights[rng.random(weights.shape) < 0.2] = 0.0
    weights[:, 0] += 0.02
    proportions = weights / weights.sum(axis=1, keepdims=True)
    depths = rng.integers(2_000, 20_000, size=n)
    reads = np.array([rng.multinomial(d, p) for d, p in zip(depths, proportions, strict=True)])
    return pd.DataFrame(reads.astype(float), columns=list(taxa),
                        index=sample_index(n) if index is None else index)


def clinical_frame(
    index: pd.Index, seed: int, treatments: Sequence[str] = TREATMENTS
) -> pd.DataFrame:
    """Typed clinical fields with some values missing, as `model_input` expects them."""
    rng = np.random.default_rng(seed)
    n = len(index)
    age = rng.integers(18, 86, size=n).astype(float)
    age[rng.random(n) < 0.1] = np.nan
    sex = np.where(rng.random(n) < 0.5, "female", "male").astype(object)
    sex[rng.random(n) < 0.1] = None
    return pd.DataFrame(
        {
            "treatment": rng.choice(list(treatments), size=n),
            "baseline_platelets": rng.uniform(2.0, 40.0, size=n).round(1),
            "age_years": age,
            "sex": sex,
            "months_since_diagnosis": rng.exponential(10.0, size=n).round(2),
            "bleeding_score": rng.integers(0, 3, size=n).astype(str),
            "bleeding_scale": "WHO",
            "prior_lines": rng.integers(0, 4, size=n).astype(float),
            "h_pylori": (rng.random(n) < 0.2).astype(float),
        },
        index=index,
    )


def raw_frame(n: int, seed: int, taxa: Sequence[str] = GENERA) -> pd.DataFrame:
    """A model-input frame of n episodes (clinical fields + taxon reads)."""
    counts = counts_frame(n, seed, taxa)
    return model_input(clinical_frame(counts.index, seed + 1), counts)


def cohort(
    n_subjects: int, seed: int, signal: bool = True
) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """(X, y, groups): 1-2 episodes per subject; with `signal` the label follows Genus0.

    The label is the log relative abundance of the first genus plus a little noise, so a
    working pipeline should rank held-out episodes well; without it the label is shuffled.
    """
    rng = np.random.default_rng(seed)
    episodes = rng.integers(1, 3, size=n_subjects)
    groups = np.repeat([f"P{i}" for i in range(n_subjects)], episodes)
    X = raw_frame(len(groups), seed)
    taxa = X[list(GENERA)].to_numpy()
    score = np.log(taxa[:, 0] / taxa.sum(axis=1)) + rng.normal(0.0, 0.3, size=len(groups))
    y = (score > np.median(score)).astype(int)
    if not signal:
        y = rng.permutation(y)
    return X, y, groups
