"""The fitted pipeline compiled, at load, into an array-only scoring path.

A request is a few patients; scikit-learn and pandas spend far longer checking and
aligning frames than the arithmetic takes. `CompiledModel` reads the fitted parameters of
every step once (the taxon-key -> column map, where a species read can feed its genus
column too; per rank, the prevalence filter's support and the CLR pseudocount; the clinical
encoding, the blocks, the linear design's medians, centres,
interactions, scaler and weights, or the XGBoost booster) and scores with numpy alone: the
linear family's log-odds and its exact SHAP values (coefficient x standardised value, the
LinearExplainer's against the all-zero background) come from one design matrix; XGBoost's
from the booster's own margin and `pred_contribs` (exact TreeSHAP) on one DMatrix. Each
fitted pipeline of the `ResponseModel` becomes a head (the chosen model and the forest
stacked with it) sharing the features; the recalibration and stacking weights are applied to
the heads' log-odds and SHAP values alike, so base + sum of contributions is the served
log-odds.

tests/test_scoring.py checks it against the scikit-learn pipeline and the training-side
`ShapExplainer`, for every model family, on simulator cohorts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import xgboost as xgb
from scipy.special import expit
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline

from training import schema
from training.explain import Explanation, design_groups
from training.features import phases, relative_abundances
from training.schema import CLINICAL_BY_NAME, Kind
from training.structure import DIVERSITY, LinearDesign
from training.taxonomy import levels, lineage_at_rank, taxon_features
from training.tuning import ResponseModel


class PatientLike(Protocol):
    treatment: str
    clinical: Any
    microbiome: Any


@dataclass(frozen=True)
class Scored:
    """What one batch comes to: the explanation (training.explain's), the probabilities,
    and per patient the share of reads on known taxa and the unknown taxa's shares."""

    explanation: Explanation  # zero contributions when not asked to explain
    probability: np.ndarray  # recalibrated, from the estimator's own margin
    taxa_matched: np.ndarray
    unknown: list[dict[str, float]]


class CompiledModel:
    def __init__(self, model: ResponseModel) -> None:
        pipeline = model.pipeline_
        steps = pipeline.named_steps
        self.shift = float(model.intercept_)
        aligner = steps["align"]
        self.rank: str = aligner.rank
        self.finest = levels(self.rank)[-1]  # unknown taxa are named at it
        position = {name: i for i, name in enumerate(aligner.vocabulary_)}
        self.taxon_index: dict[str, int] = {key: position[name]
                                            for key, name in aligner.keys_.items()}
        self.n_taxa = len(aligner.vocabulary_)
        features = steps["features"]
        # One composition per rank (training.features.feature_steps): its vocabulary columns,
        # the filter's kept columns within them, and the CLR's pseudocount.
        columns = {name: np.array([position[str(c)] for c in selected], dtype=int)
                   for name, _, selected in features.transformers_ if name != "clinical"}
        self.compositions: list[tuple[np.ndarray, np.ndarray, float]] = []
        layout: list[str] = []
        vocabulary = np.asarray(aligner.vocabulary_, dtype=object)
        for name, transformer in features.named_transformers_.items():
            if name.startswith("taxa") and len(columns[name]):  # an empty one is not fitted
                kept = np.flatnonzero(transformer.named_steps["filter"].support_)
                pseudocount = float(transformer.named_steps["clr"].pseudocount)
                self.compositions.append((columns[name], kept, pseudocount))
                layout += list(vocabulary[columns[name][kept]])
        self.diversity_columns = columns["diversity"]
        self.detection = float(features.named_transformers_["diversity"].detection)
        encoder = features.named_transformers_["clinical"]
        self.clinical_names = [str(n) for n in encoder.get_feature_names_out()]
        unknown = [n for n in self.clinical_names if not _compilable(n)]
        if unknown:  # fail at load, not on every request
            raise TypeError(f"cannot compile the clinical features {unknown}")
        layout += [*DIVERSITY, *self.clinical_names]
        if [str(n) for n in features.get_feature_names_out()] != layout:
            raise TypeError("cannot compile this pipeline: unexpected feature layout")
        self.blocks = np.flatnonzero(steps["blocks"].support_)
        self.input_names = design_groups(pipeline)[0]
        self.abundance_column = np.array([position.get(str(n), -1) for n in self.input_names])
        self.heads = [(_head(member), weight) for member, weight in model.members()]
        for member, _ in model.members()[1:]:
            if not _same_features(pipeline, member):
                raise TypeError("cannot compile this model: its stacked pipelines do not "
                                "share their features")

    # --- raw inputs -> features --------------------------------------------------------------

    def _profiles(self, profiles: Sequence[Mapping[str, float]]
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[dict[str, float]]]:
        """Reads per vocabulary taxon, total reads, reads that land on a feature, and the
        unknown taxa's shares."""
        reads = np.zeros((len(profiles), self.n_taxa))
        totals, matched = np.zeros(len(profiles)), np.zeros(len(profiles))
        unknown: list[dict[str, float]] = []
        for i, counts in enumerate(profiles):
            total = math.fsum(counts.values())
            totals[i] = total
            missing: dict[str, float] = {}
            for taxon, value in counts.items():
                known = False
                for key, _ in taxon_features(taxon, self.rank):
                    column = self.taxon_index.get(key)
                    if column is not None:
                        reads[i, column] += value
                        known = True
                if known:
                    matched[i] += value
                elif value > 0 and total > 0:
                    name = lineage_at_rank(taxon, self.finest) or taxon
                    missing[name] = missing.get(name, 0.0) + value / total
            unknown.append(missing)
        return reads, totals, matched, unknown

    def _clinical(self, patients: Sequence[PatientLike]) -> np.ndarray:
        def column(name: str) -> np.ndarray:
            values = [getattr(p.clinical, name, None) for p in patients]
            return np.array([np.nan if v is None else float(v) for v in values])

        months = column("months_since_diagnosis")
        phase = {f"phase={k}": np.where(np.isnan(months), np.nan, v.astype(float))
                 for k, v in phases(months).items()}
        out = np.empty((len(patients), len(self.clinical_names)))
        for j, name in enumerate(self.clinical_names):
            if name.startswith("treatment="):
                treatment = name.removeprefix("treatment=")
                out[:, j] = [float(p.treatment == treatment) for p in patients]
            elif name in phase:
                out[:, j] = phase[name]
            elif name == "sex=male":
                out[:, j] = [np.nan if p.clinical.sex is None else float(p.clinical.sex == "male")
                             for p in patients]
            elif name == "bleeding_severity":
                out[:, j] = [schema.bleeding_severity(p.clinical.bleeding_score,
                                                      p.clinical.bleeding_scale)
                             for p in patients]
            elif name in CLINICAL_BY_NAME and CLINICAL_BY_NAME[name].kind in (Kind.NUMBER,
                                                                               Kind.BOOLEAN):
                out[:, j] = column(name)
            else:
                raise TypeError(f"cannot compile the clinical feature {name!r}")
        return out

    def features(self, reads: np.ndarray, clinical: np.ndarray) -> np.ndarray:
        """The named input features (after the blocks): CLR of kept taxa per rank,
        diversity, clinical encoding, in the pipeline's order."""
        clrs = []
        for columns, kept, pseudocount in self.compositions:
            logs = np.log(relative_abundances(reads[:, columns])[:, kept] + pseudocount)
            clrs.append(logs - logs.mean(axis=1, keepdims=True))
        proportions = relative_abundances(reads[:, self.diversity_columns])
        with np.errstate(divide="ignore", invalid="ignore"):
            terms = np.where(proportions > 0, proportions * np.log(proportions), 0.0)
        shannon = -terms.sum(axis=1)
        shannon[proportions.sum(axis=1) == 0] = np.nan
        observed = (proportions >= self.detection).sum(axis=1).astype(float)
        return np.hstack([*clrs, shannon[:, None], observed[:, None], clinical])[:, self.blocks]

    # --- features -> log-odds and SHAP -------------------------------------------------------

    def score(self, patients: Sequence[PatientLike], explain: bool = True) -> Scored:
        """Probabilities, recalibrated and stacked over the heads, and with `explain` their
        exact SHAP values on the same scale, from one pass over each head."""
        reads, totals, matched, unknown = self._profiles([p.microbiome.counts
                                                          for p in patients])
        values = self.features(reads, self._clinical(patients))
        n = len(patients)
        log_odds, contributions = np.full(n, self.shift), np.zeros((n, len(self.input_names)))
        base = self.shift
        for head, weight in self.heads:
            margin, design_shap, head_base = head.evaluate(values, explain)
            log_odds += weight * margin
            if design_shap is not None:
                np.add.at(contributions.T, head.groups, weight * design_shap.T)
                base += weight * head_base
        with np.errstate(divide="ignore", invalid="ignore"):
            shares = np.where(self.abundance_column >= 0,
                              reads[:, np.maximum(self.abundance_column, 0)]
                              / np.where(totals > 0, totals, np.nan)[:, None], np.nan)
        explanation = Explanation(
            feature_names=self.input_names, values=values,
            shap_values=contributions, base_value=base,
            relative_abundance=shares)
        share = np.divide(matched, totals, out=np.zeros(n), where=totals > 0)
        return Scored(explanation, expit(log_odds), np.clip(share, 0.0, 1.0), unknown)


def _compilable(name: str) -> bool:
    """Whether `CompiledModel._clinical` knows how to compute a clinical feature."""
    field = CLINICAL_BY_NAME.get(name)
    return (name.startswith(("treatment=", "phase=")) or name in ("sex=male", "bleeding_severity")
            or (field is not None and field.kind in (Kind.NUMBER, Kind.BOOLEAN)))


def _same_features(a: Pipeline, b: Pipeline) -> bool:
    """Whether two fitted pipelines compute the same input features (the compiled path
    computes them once, from the first)."""
    aligners = a.named_steps["align"], b.named_steps["align"]
    return (aligners[0].rank == aligners[1].rank
            and list(aligners[0].vocabulary_) == list(aligners[1].vocabulary_)
            and aligners[0].keys_ == aligners[1].keys_
            and list(design_groups(a)[0]) == list(design_groups(b)[0]))


def _head(pipeline: Pipeline) -> LinearHead | TreeHead:
    estimator = pipeline[-1]
    groups = design_groups(pipeline)[1]
    if isinstance(estimator, LogisticRegression):
        return LinearHead(pipeline.named_steps["design"], estimator, groups)
    if isinstance(estimator, xgb.XGBModel):
        return TreeHead(estimator.get_booster(), groups)
    raise TypeError(f"cannot compile {type(estimator).__name__}")


class LinearHead:
    """The linear family's design and coefficients: log-odds and exact SHAP values
    (coefficient x standardised value) are one matrix product each."""

    def __init__(self, design: LinearDesign, estimator: LogisticRegression,
                 groups: np.ndarray) -> None:
        self.groups = groups
        imputer = design.imputer_
        medians = np.asarray(imputer.statistics_, dtype=np.float64)
        self.medians = np.where(np.isnan(medians), 0.0, medians)  # keep_empty_features
        self.indicators = (np.asarray(imputer.indicator_.features_) if
                           design.missing_indicators else np.array([], dtype=int))
        self.log_columns = np.flatnonzero(design.log_columns_)
        self.fields = np.asarray(design.fields_, dtype=int)
        self.centers = np.asarray(design.centers_, dtype=np.float64)
        names = [str(c) for c in design.feature_names_in_]
        self.treatment_columns = np.array([names.index(t) for t in design.treatments_],
                                          dtype=int)
        self.mean = np.asarray(design.scaler_.mean_, dtype=np.float64)
        self.scaler_scale = np.asarray(design.scaler_.scale_, dtype=np.float64)
        self.weights = np.asarray(design.weights_, dtype=np.float64)
        self.coef = np.asarray(estimator.coef_, dtype=np.float64).ravel()
        self.intercept = float(np.ravel(estimator.intercept_)[0])

    def design(self, values: np.ndarray) -> np.ndarray:
        missing = np.isnan(values)
        imputed = np.where(missing, self.medians, values)
        base = imputed.copy()
        base[:, self.log_columns] = np.log1p(np.clip(base[:, self.log_columns], 0, None))
        centred = base[:, self.fields] - self.centers
        products = [centred * values[:, [t]] for t in self.treatment_columns]
        indicators = missing[:, self.indicators].astype(float)
        design = np.hstack([base, *products, indicators])
        return (design - self.mean) / self.scaler_scale * self.weights

    def evaluate(self, values: np.ndarray, explain: bool) -> tuple[np.ndarray,
                                                                  np.ndarray | None, float]:
        """(raw log-odds, design SHAP values or None, base value), the design built once."""
        design = self.design(values)
        return (design @ self.coef + self.intercept, design * self.coef if explain else None,
                self.intercept)


class TreeHead:
    """An XGBoost booster: log-odds and exact TreeSHAP (`pred_contribs`) from one DMatrix;
    log-odds alone from `inplace_predict`, which needs none."""

    def __init__(self, booster: xgb.Booster, groups: np.ndarray) -> None:
        self.booster, self.groups = booster, groups

    def evaluate(self, values: np.ndarray, explain: bool) -> tuple[np.ndarray,
                                                                  np.ndarray | None, float]:
        """(raw log-odds, SHAP values per feature or None, base value). The margin is
        XGBoost's own prediction either way (bitwise what the pipeline serves), not the sum
        of the float32 contributions."""
        if not explain:
            margin = self.booster.inplace_predict(values, predict_type="margin")
            return np.asarray(margin, dtype=np.float64), None, 0.0
        matrix = xgb.DMatrix(values, nthread=1)
        margin = np.asarray(self.booster.predict(matrix, output_margin=True), dtype=np.float64)
        contributions = np.asarray(self.booster.predict(matrix, pred_contribs=True),
                                   dtype=np.float64)
        return margin, contributions[:, :-1], float(contributions[0, -1])
