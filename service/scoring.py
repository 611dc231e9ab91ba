"""The fitted pipeline compiled, at load, into an array-only scoring path.

A request is a few patients; scikit-learn and pandas spend far longer checking and
aligning frames than the arithmetic takes. `CompiledModel` reads the fitted parameters of
every step once (the taxon-key -> column map, the prevalence filter's support, the CLR
pseudocount, the clinical encoding, the blocks, the linear design's medians, centres,
interactions, scaler and weights, or the XGBoost booster) and scores with numpy alone: the
linear family's log-odds and its exact SHAP values (coefficient x standardised value, the
LinearExplainer's against the all-zero background) are one matrix product each; XGBoost's
come from the booster's own `inplace_predict` and `pred_contribs` (exact TreeSHAP). The
recalibration is applied to both, so base + sum of contributions is the served log-odds.

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

from training import schema
from training.explain import Explanation, design_groups
from training.features import phases
from training.schema import CLINICAL_BY_NAME, Kind
from training.structure import DIVERSITY, LinearDesign
from training.taxonomy import lineage_at_rank, taxon_key
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
        self.shift, self.scale = float(model.intercept_), float(model.slope_)
        aligner = steps["align"]
        self.rank: str = aligner.rank
        position = {name: i for i, name in enumerate(aligner.vocabulary_)}
        self.taxon_index: dict[str, int] = {key: position[name]
                                            for key, name in aligner.keys_.items()}
        self.n_taxa = len(aligner.vocabulary_)
        features = steps["features"]
        taxa = features.named_transformers_["taxa"].named_steps
        self.kept = np.flatnonzero(taxa["filter"].support_)
        self.pseudocount = float(taxa["clr"].pseudocount)
        self.detection = float(features.named_transformers_["diversity"].detection)
        encoder = features.named_transformers_["clinical"]
        self.clinical_names = [str(n) for n in encoder.get_feature_names_out()]
        unknown = [n for n in self.clinical_names if not _compilable(n)]
        if unknown:  # fail at load, not on every request
            raise TypeError(f"cannot compile the clinical features {unknown}")
        vocabulary = np.asarray(aligner.vocabulary_, dtype=object)
        layout = [*vocabulary[self.kept], *DIVERSITY, *self.clinical_names]
        if [str(n) for n in features.get_feature_names_out()] != layout:
            raise TypeError("cannot compile this pipeline: unexpected feature layout")
        self.blocks = np.flatnonzero(steps["blocks"].support_)
        self.input_names, self.groups = design_groups(pipeline)
        self.abundance_column = np.array([position.get(str(n), -1) for n in self.input_names])
        estimator = pipeline[-1]
        if isinstance(estimator, LogisticRegression):
            self._linear(steps["design"], estimator)
        elif isinstance(estimator, xgb.XGBModel):
            self.booster = estimator.get_booster()
            self.kind = "trees"
        else:
            raise TypeError(f"cannot compile {type(estimator).__name__}")

    def _linear(self, design: LinearDesign, estimator: LogisticRegression) -> None:
        self.kind = "linear"
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

    # --- raw inputs -> features --------------------------------------------------------------

    def _profiles(self, profiles: Sequence[Mapping[str, float]]
                  ) -> tuple[np.ndarray, np.ndarray, list[dict[str, float]]]:
        """Reads per vocabulary taxon, total reads, and the unknown taxa's shares."""
        reads = np.zeros((len(profiles), self.n_taxa))
        totals = np.zeros(len(profiles))
        unknown: list[dict[str, float]] = []
        for i, counts in enumerate(profiles):
            total = math.fsum(counts.values())
            totals[i] = total
            missing: dict[str, float] = {}
            for taxon, value in counts.items():
                column = self.taxon_index.get(taxon_key(taxon, self.rank))
                if column is not None:
                    reads[i, column] += value
                elif value > 0 and total > 0:
                    name = lineage_at_rank(taxon, self.rank) or taxon
                    missing[name] = missing.get(name, 0.0) + value / total
            unknown.append(missing)
        return reads, totals, unknown

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
        """The named input features (after the blocks): CLR of kept taxa, diversity,
        clinical encoding, in the pipeline's order."""
        totals = reads.sum(axis=1, keepdims=True)
        proportions = np.divide(reads, totals, out=np.zeros_like(reads), where=totals > 0)
        logs = np.log(proportions[:, self.kept] + self.pseudocount)
        clr = logs - logs.mean(axis=1, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            terms = np.where(proportions > 0, proportions * np.log(proportions), 0.0)
        shannon = -terms.sum(axis=1)
        shannon[totals[:, 0] == 0] = np.nan
        observed = (proportions >= self.detection).sum(axis=1).astype(float)
        return np.hstack([clr, shannon[:, None], observed[:, None], clinical])[:, self.blocks]

    # --- features -> log-odds and SHAP -------------------------------------------------------

    def _linear_design(self, values: np.ndarray) -> np.ndarray:
        missing = np.isnan(values)
        imputed = np.where(missing, self.medians, values)
        base = imputed.copy()
        base[:, self.log_columns] = np.log1p(np.clip(base[:, self.log_columns], 0, None))
        centred = base[:, self.fields] - self.centers
        products = [centred * values[:, [t]] for t in self.treatment_columns]
        indicators = missing[:, self.indicators].astype(float)
        design = np.hstack([base, *products, indicators])
        return (design - self.mean) / self.scaler_scale * self.weights

    def _contributions(self, values: np.ndarray) -> tuple[np.ndarray, float]:
        """(design SHAP values, base value) in the uncalibrated log-odds."""
        if self.kind == "linear":
            return self._linear_design(values) * self.coef, self.intercept
        contributions = self.booster.predict(xgb.DMatrix(values), pred_contribs=True)
        contributions = np.asarray(contributions, dtype=np.float64)
        return contributions[:, :-1], float(contributions[0, -1])

    def margin(self, values: np.ndarray) -> np.ndarray:
        """The pipeline's raw log-odds (before recalibration)."""
        if self.kind == "linear":
            return self._linear_design(values) @ self.coef + self.intercept
        return np.asarray(self.booster.inplace_predict(values, predict_type="margin"),
                          dtype=np.float64)

    def score(self, patients: Sequence[PatientLike], explain: bool = True) -> Scored:
        reads, totals, unknown = self._profiles([p.microbiome.counts for p in patients])
        values = self.features(reads, self._clinical(patients))
        n = len(patients)
        grouped, base = np.zeros((n, len(self.input_names))), 0.0
        if explain:
            design_shap, base = self._contributions(values)
            np.add.at(grouped.T, self.groups, design_shap.T)
        with np.errstate(divide="ignore", invalid="ignore"):
            shares = np.where(self.abundance_column >= 0,
                              reads[:, np.maximum(self.abundance_column, 0)]
                              / np.where(totals > 0, totals, np.nan)[:, None], np.nan)
        explanation = Explanation(
            feature_names=self.input_names, values=values,
            shap_values=self.scale * grouped, base_value=self.shift + self.scale * base,
            relative_abundance=shares)
        matched = np.divide(reads.sum(axis=1), totals, out=np.zeros(n), where=totals > 0)
        return Scored(explanation, expit(self.shift + self.scale * self.margin(values)),
                      np.clip(matched, 0.0, 1.0), unknown)


def _compilable(name: str) -> bool:
    """Whether `CompiledModel._clinical` knows how to compute a clinical feature."""
    field = CLINICAL_BY_NAME.get(name)
    return (name.startswith(("treatment=", "phase=")) or name in ("sex=male", "bleeding_severity")
            or (field is not None and field.kind in (Kind.NUMBER, Kind.BOOLEAN)))
