"""Real metagenomes (MetAML, Pasolli et al. 2016) through the project's own pipeline.

The simulator can only check the pipeline against a truth we wrote ourselves. Public disease
cohorts check the same code on profiles it did not generate: MetaPhlAn2 lineages (`k__...|
s__...`) in percent, from another pipeline's vocabulary. MetAML's random forests separate
cirrhosis (AUROC above 0.9) and colorectal cancer well on these cohorts, so a pipeline that
aligns, closes, filters and CLR-transforms correctly must find a strong signal there, and
none once the labels are shuffled. The data are test material without a licence (see
../shared/data/metaml/SOURCE.md) and are never copied into the repository: the tests skip
when the folder is absent.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from training.evaluation import CVConfig, nested_cross_validate, permutation_control
from training.explain import ShapExplainer
from training.features import model_input
from training.model import FAMILIES, FeatureConfig
from training.tuning import ModelSearch, ResponseModel

DATA = (Path(__file__).resolve().parents[1].parent / "shared" / "data" / "metaml"
        / "abundance_stoolsubset.txt.bz2")
TREATMENT = "corticosteroid"  # one constant treatment: the model sees microbiome signal only
CV = CVConfig(n_splits=5, n_repeats=1, n_bootstrap=200, seed=7)
NULL_CV = CVConfig(n_splits=3, n_repeats=1, n_bootstrap=100, seed=7)
NULL_PERMUTATIONS = 3
GENUS_LINEAGE = re.compile(
    r"^d__(Bacteria|Archaea|Eukaryota|Viruses);p__[^;]+;c__[^;]+;o__[^;]+;f__[^;]+;g__[^;]+$"
)


@dataclass(frozen=True)
class Task:
    """One MetAML benchmark task (filters from MetAML's dataset_selection_abundance.txt)."""

    select: Callable[[pd.DataFrame], pd.Series]
    label: Callable[[pd.DataFrame], pd.Series]
    n: int
    positives: int


TASKS: dict[str, Task] = {
    "cirrhosis": Task(
        select=lambda m: m["dataset_name"] == "Quin_gut_liver_cirrhosis",
        label=lambda m: m["disease"] == "cirrhosis",
        n=232, positives=118,
    ),
    "colorectal": Task(
        select=lambda m: (m["dataset_name"] == "Zeller_fecal_colorectal_cancer")
        & m["group"].isin(["control", "crc"]),
        label=lambda m: m["disease"] == "cancer",
        n=121, positives=48,
    ),
}

# Measured on this file with the earlier fixed-setting models (5x2 CV, seed 7): cirrhosis
# 0.92 (0.91-0.94 over CV seeds 0-4); colorectal 0.83-0.87. Nested CV of the tuned families
# is in docs/benchmarks.md. Bounds keep margin so library updates do not flap the test, yet
# a broken step (lost taxa, a wrong transform, misaligned labels or groups) drops far below.
AUROC_FLOOR: dict[str, float] = {"cirrhosis": 0.85, "colorectal": 0.75}


@dataclass(frozen=True)
class Cohort:
    X: pd.DataFrame
    y: np.ndarray
    groups: np.ndarray
    species: list[str]


@pytest.fixture(scope="module")
def metaml() -> tuple[pd.DataFrame, pd.DataFrame]:
    """(metadata, species abundances in percent), one row per stool sample."""
    if not DATA.is_file():
        pytest.skip(f"MetAML data not found at {DATA}")
    raw = pd.read_csv(DATA, sep="\t", header=None, index_col=0, dtype=str)
    taxa = raw.index.str.startswith("k__")
    species = raw.index.str.contains("|s__", regex=False) & ~raw.index.str.contains(
        "|t__", regex=False)
    return raw.loc[~taxa].T, raw.loc[species].T.astype(float)


def cohort(metaml: tuple[pd.DataFrame, pd.DataFrame], name: str) -> Cohort:
    metadata, abundances = metaml
    task = TASKS[name]
    chosen = metadata.loc[task.select(metadata)]
    profiles = abundances.loc[chosen.index]
    profiles = profiles.loc[:, profiles.sum() > 0]
    clinical = pd.DataFrame({"treatment": TREATMENT}, index=chosen.index)
    y = task.label(chosen).astype(int).to_numpy()
    assert (len(y), int(y.sum())) == (task.n, task.positives), "task filter drifted from MetAML"
    return Cohort(model_input(clinical, profiles), y, chosen["subjectID"].to_numpy(),
                  list(profiles.columns))


@pytest.fixture(scope="module")
def cirrhosis(metaml: tuple[pd.DataFrame, pd.DataFrame]) -> Cohort:
    return cohort(metaml, "cirrhosis")


def test_metaphlan_species_aggregate_to_genus_lineages(cirrhosis: Cohort) -> None:
    """Every MetaPhlAn species lands on a full canonical genus lineage, and no percent is lost."""
    pipeline = FAMILIES["linear"].build(FeatureConfig(), seed=7)
    aligner = pipeline.named_steps["align"].fit(cirrhosis.X)
    vocabulary = aligner.vocabulary_
    assert all("|s__" in s and "|t__" not in s for s in cirrhosis.species)
    assert len(vocabulary) > 100
    assert [v for v in vocabulary if not GENUS_LINEAGE.match(v)] == []
    bacteria = sum(v.startswith("d__Bacteria;p__") for v in vocabulary)
    assert bacteria / len(vocabulary) > 0.9
    aligned = aligner.transform(cirrhosis.X)
    np.testing.assert_allclose(aligned[vocabulary].sum(axis=1),
                               cirrhosis.X[cirrhosis.species].sum(axis=1), rtol=1e-9)
    assert aligned[vocabulary].sum(axis=1).between(80, 100.001).all()  # percent, not reads


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("task", sorted(TASKS))
def test_real_disease_signal_is_found(
    metaml: tuple[pd.DataFrame, pd.DataFrame], task: str, family: str
) -> None:
    """Nested CV of the tuned family (the product's procedure) finds the disease."""
    data = cohort(metaml, task)
    search = ModelSearch(families=(family,), seed=CV.seed)
    result = nested_cross_validate(search, data.X, data.y, data.groups, CV, regions=False)
    summary = result.champion.summary
    assert summary["auroc_mean"] > AUROC_FLOOR[task], summary
    assert summary["auroc_ci_low"] <= summary["auroc_mean"] <= summary["auroc_ci_high"]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_permuted_labels_give_chance_auroc(cirrhosis: Cohort, family: str) -> None:
    """Same data, labels permuted by subject, through the nested procedure: far from 0.5
    would mean leakage. The mean of three permutations is held to 0.5 +- 0.12."""
    search = ModelSearch(families=(family,), seed=NULL_CV.seed)
    aurocs = permutation_control(search, cirrhosis.X, cirrhosis.y, cirrhosis.groups, NULL_CV,
                                 NULL_PERMUTATIONS)
    assert abs(np.mean(aurocs) - 0.5) < 0.12, aurocs


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_shap_is_exact_on_real_profiles(cirrhosis: Cohort, family: str) -> None:
    """base + sum(SHAP) must be the served (recalibrated) log-odds, which the service reports.

    Compared with the model's margin rather than logit(predict_proba): XGBoost returns
    float32 probabilities, whose logit carries ~1e-5 of rounding near 0 and 1.
    """
    model = ResponseModel(FAMILIES[family].build(FeatureConfig(), seed=7), seed=7).fit(
        cirrhosis.X, cirrhosis.y, cirrhosis.groups)
    explanation = ShapExplainer(model).explain(cirrhosis.X)
    np.testing.assert_allclose(explanation.log_odds, model.decision_function(cirrhosis.X),
                               rtol=0, atol=1e-5)
    np.testing.assert_allclose(explanation.probability, model.predict_proba(cirrhosis.X)[:, 1],
                               rtol=0, atol=1e-6)
