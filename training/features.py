"""From raw model inputs (clinical fields + taxon read counts) to the model's feature matrix.

Every step is a scikit-learn transformer that learns only in `fit`, so the whole path lives
inside one Pipeline: cross-validation refits it per fold (no leakage) and the service runs
the very object that was evaluated. Each step names its outputs, so a SHAP value always maps
back to a named feature.

The raw input is a DataFrame with one row per treatment episode: `treatment`, every field of
`schema.CLINICAL_FIELDS` (see `model_input`), and one column per taxon whose name is a
lineage string. Any taxa may appear: the first step aligns them to the training vocabulary.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import entropy
from sklearn.base import BaseEstimator, OneToOneFeatureMixin, TransformerMixin
from sklearn.compose import ColumnTransformer, make_column_selector
from sklearn.feature_selection import SelectorMixin
from sklearn.pipeline import Pipeline
from sklearn.utils.validation import check_is_fitted, validate_data

from training import schema
from training.schema import CLINICAL_FIELDS, FEATURE_RANKS, TREATMENT, Kind
from training.taxonomy import RANK_PREFIXES_OUT, levels, lineage_at_rank, taxon_features

TAXON_COLUMNS = make_column_selector(pattern=schema.TAXON_PATTERN.pattern)
CLINICAL_COLUMNS = make_column_selector(pattern=r"^(?!\s*(?:[dkpcofgst]|D_\d)__)")

def phases(months: pd.Series) -> dict[str, pd.Series]:
    """ITP phase by time since diagnosis (IWG): newly diagnosed < 3 months, persistent
    3-12 months, chronic > 12 months."""
    return {
        "newly_diagnosed": months < 3,
        "persistent": (months >= 3) & (months <= 12),
        "chronic": months > 12,
    }


def model_input(clinical: pd.DataFrame, counts: pd.DataFrame) -> pd.DataFrame:
    """Join typed clinical data and taxon counts into the frame every pipeline consumes.

    Absent optional fields become missing values, so a cohort (or a request) that lacks a
    marker still has the columns the pipeline was built for.
    """
    columns = {TREATMENT: clinical[TREATMENT].astype(object)}
    for field in CLINICAL_FIELDS:
        if field.kind in (Kind.NUMBER, Kind.BOOLEAN):
            values = clinical.get(field.name, pd.Series(np.nan, index=clinical.index))
            columns[field.name] = pd.to_numeric(values, errors="raise").astype(float)
        else:
            values = clinical.get(field.name, pd.Series(None, index=clinical.index, dtype=object))
            columns[field.name] = values.astype(object).where(values.notna(), None)
    frame = pd.DataFrame(columns, index=clinical.index)
    return pd.concat([frame, counts.reindex(clinical.index).astype(float)], axis=1)


class TaxonomyAligner(TransformerMixin, BaseEstimator):
    """Aggregate taxon columns to one rank (or to genus and species side by side, `both`)
    and align them to the training vocabulary.

    Taxa the model never saw cannot be scored; they are left out of the output and reported
    by `unknown_taxa`, never dropped silently. Taxa of the vocabulary that a sample lacks
    count as zero reads. Clinical (non-taxon) columns pass through unchanged.
    """

    def __init__(self, rank: str = "genus") -> None:
        self.rank = rank

    def fit(self, X: pd.DataFrame, y: object = None) -> TaxonomyAligner:
        if self.rank not in FEATURE_RANKS:
            raise ValueError(f"rank must be one of {FEATURE_RANKS}, got {self.rank!r}")
        self.feature_names_in_ = np.asarray(X.columns, dtype=object)
        self.n_features_in_ = X.shape[1]
        self.clinical_columns_ = [c for c in X.columns if not schema.is_taxon(c)]
        taxa = [c for c in X.columns if schema.is_taxon(c)]
        totals = X[taxa].sum(axis=0).to_numpy(dtype=float)
        reads = pd.DataFrame([(key, name, total) for taxon, total in zip(taxa, totals, strict=True)
                              for key, name in taxon_features(taxon, self.rank)],
                             columns=["key", "name", "reads"])
        reads = reads[reads["reads"] > 0]
        if reads.empty:
            raise ValueError("no taxon with any reads: the feature table is empty")
        # One feature per key, named by the lineage that carried most of its reads.
        names = (reads.groupby(["key", "name"])["reads"].sum().sort_values(ascending=False)
                 .reset_index().drop_duplicates("key").set_index("key")["name"])
        self.keys_ = names.sort_values().to_dict()
        self.vocabulary_ = sorted(self.keys_.values())
        return self

    def _aggregate(self, X: pd.DataFrame) -> pd.DataFrame:
        """Reads summed per taxon key (a read counts once per rank of `rank`)."""
        taxa = [c for c in X.columns if schema.is_taxon(c)]
        pairs = [(j, key) for j, taxon in enumerate(taxa)
                 for key, _ in taxon_features(taxon, self.rank)]
        columns = np.array([j for j, _ in pairs], dtype=int)
        codes, uniques = pd.factorize(pd.Index([key for _, key in pairs]))
        values = X[taxa].to_numpy(dtype=float)[:, columns]
        summed = np.zeros((len(X), len(uniques)))
        np.add.at(summed.T, codes, values.T)
        return pd.DataFrame(summed, index=X.index, columns=uniques)

    def transform(self, X: pd.DataFrame) -> pd.DataFrame:
        check_is_fitted(self, "vocabulary_")
        missing = [c for c in self.clinical_columns_ if c not in X.columns]
        if missing:
            raise ValueError(f"input lacks columns the model was trained with: {missing}")
        taxa = (self._aggregate(X).reindex(columns=list(self.keys_), fill_value=0.0)
                .set_axis(list(self.keys_.values()), axis=1)[self.vocabulary_])
        return pd.concat([X[self.clinical_columns_], taxa], axis=1)

    def known(self, taxon: str) -> bool:
        """Whether any of a taxon's reads land on a model feature."""
        return any(key in self.keys_ for key, _ in taxon_features(taxon, self.rank))

    def unknown_taxa(self, counts: Mapping[str, float]) -> dict[str, float]:
        """Taxa of one profile the model never saw (at its rank), with their share of reads.

        Works on the profile as given, one pass over its taxa with the cached lineage
        parser, so the service can report without aggregating the whole frame again.
        """
        check_is_fitted(self, "vocabulary_")
        total = sum(counts.values())
        if total <= 0:
            return {}
        finest = levels(self.rank)[-1]
        shares: dict[str, float] = {}
        for taxon, reads in counts.items():
            if reads > 0 and not self.known(taxon):
                name = lineage_at_rank(taxon, finest) or taxon
                shares[name] = shares.get(name, 0.0) + reads / total
        return shares

    def matched_share(self, X: pd.DataFrame) -> pd.Series:
        """Share of each sample's reads that land on a model feature (1.0: all matched)."""
        check_is_fitted(self, "vocabulary_")
        taxa = [c for c in X.columns if schema.is_taxon(c)]
        total = X[taxa].sum(axis=1)
        known = X[[c for c in taxa if self.known(c)]].sum(axis=1)
        return (known / total.where(total > 0)).rename("taxa_matched")

    def get_feature_names_out(self, input_features: object = None) -> np.ndarray:
        check_is_fitted(self, "vocabulary_")
        return np.asarray([*self.clinical_columns_, *self.vocabulary_], dtype=object)


class Closure(OneToOneFeatureMixin, TransformerMixin, BaseEstimator):
    """Reads -> proportions per sample: sequencing depth carries no biology."""

    def fit(self, X: pd.DataFrame | np.ndarray, y: object = None) -> Closure:
        _nonnegative(validate_data(self, X))
        return self

    def transform(self, X: pd.DataFrame | np.ndarray) -> np.ndarray:
        check_is_fitted(self)
        values = validate_data(self, X, reset=False, dtype=float)
        return relative_abundances(_nonnegative(values))


class PrevalenceFilter(SelectorMixin, BaseEstimator):
    """Keep taxa present in enough samples and abundant enough on average.

    Rare taxa carry noise, not signal, at cohort sizes of a few hundred; fitted inside the
    folds because prevalence is computed from the training samples.
    """

    def __init__(self, min_prevalence: float = 0.1, min_abundance: float = 1e-4) -> None:
        self.min_prevalence = min_prevalence
        self.min_abundance = min_abundance

    def fit(self, X: pd.DataFrame | np.ndarray, y: object = None) -> PrevalenceFilter:
        values = validate_data(self, X, dtype=float)
        self.prevalence_ = (values > 0).mean(axis=0)
        self.mean_abundance_ = values.mean(axis=0)
        self.support_ = (self.prevalence_ >= self.min_prevalence) & (
            self.mean_abundance_ >= self.min_abundance
        )
        if not self.support_.any():
            raise ValueError(
                f"no taxon passes the filter (prevalence >= {self.min_prevalence}, "
                f"mean relative abundance >= {self.min_abundance})"
            )
        return self

    def _get_support_mask(self) -> np.ndarray:
        check_is_fitted(self, "support_")
        return self.support_


class CLR(OneToOneFeatureMixin, TransformerMixin, BaseEstimator):
    """Centred log-ratio of proportions: the standard map of compositions to real space.

    The pseudocount replaces zeros (1e-5 of the reads, as in SIAMCAT's log.n0 default) so
    absent taxa get a finite, low value; the transform has nothing to learn.
    """

    def __init__(self, pseudocount: float = 1e-5) -> None:
        self.pseudocount = pseudocount

    def fit(self, X: pd.DataFrame | np.ndarray, y: object = None) -> CLR:
        validate_data(self, X)
        return self

    def transform(self, X: pd.DataFrame | np.ndarray) -> np.ndarray:
        check_is_fitted(self)
        logs = np.log(validate_data(self, X, reset=False, dtype=float) + self.pseudocount)
        return logs - logs.mean(axis=1, keepdims=True)


class AlphaDiversity(TransformerMixin, BaseEstimator):
    """Shannon diversity and observed genera, from the full (unfiltered) profile.

    A genus counts as observed above `detection` relative abundance rather than at one read,
    which makes richness less dependent on sequencing depth.
    """

    def __init__(self, detection: float = 1e-4) -> None:
        self.detection = detection

    def fit(self, X: pd.DataFrame | np.ndarray, y: object = None) -> AlphaDiversity:
        validate_data(self, X)
        return self

    def transform(self, X: pd.DataFrame | np.ndarray) -> np.ndarray:
        check_is_fitted(self)
        values = validate_data(self, X, reset=False, dtype=float)
        proportions = relative_abundances(_nonnegative(values))
        shannon = entropy(proportions, axis=1)
        shannon[proportions.sum(axis=1) == 0] = np.nan  # no reads: diversity undefined
        observed = (proportions >= self.detection).sum(axis=1).astype(float)
        return np.column_stack([shannon, observed])

    def get_feature_names_out(self, input_features: object = None) -> np.ndarray:
        return np.asarray(["shannon_diversity", "observed_genera"], dtype=object)


class ClinicalEncoder(TransformerMixin, BaseEstimator):
    """Treatment and clinical fields -> numbers, keeping missing values missing.

    Missing stays NaN so the estimator decides: XGBoost learns a direction for it, the
    linear model imputes inside its own pipeline. Fit records the treatments seen (a model
    cannot speak for a treatment it never saw) and each numeric field's training range, which
    the service uses to flag extrapolation.
    """

    def fit(self, X: pd.DataFrame, y: object = None) -> ClinicalEncoder:
        self.treatments_ = sorted(set(X[TREATMENT].dropna()))
        encoded = self._encode(X, check=False)
        self.training_ranges_ = {
            field.name: [float(np.nanmin(col)), float(np.nanmax(col))]
            for field in CLINICAL_FIELDS
            if field.kind == Kind.NUMBER
            and np.isfinite(col := X[field.name].to_numpy(dtype=float)).any()
        }
        self.feature_names_out_ = np.asarray(encoded.columns, dtype=object)
        return self

    def _encode(self, X: pd.DataFrame, check: bool = True) -> pd.DataFrame:
        treatment = X[TREATMENT].astype(object)
        if check:
            unknown = sorted(set(treatment.dropna()) - set(self.treatments_))
            if unknown:
                raise ValueError(
                    f"treatment {unknown} was not in the training data; "
                    f"the model knows {self.treatments_}"
                )
        columns: dict[str, pd.Series] = {
            f"treatment={t}": (treatment == t).astype(float) for t in self.treatments_
        }
        for field in CLINICAL_FIELDS:
            if field.kind in (Kind.NUMBER, Kind.BOOLEAN):
                columns[field.name] = X[field.name].astype(float)
        months = X["months_since_diagnosis"].astype(float)
        for phase, inside in phases(months).items():
            columns[f"phase={phase}"] = inside.astype(float).where(months.notna())
        sex = X["sex"].astype(object)
        columns["sex=male"] = (sex == "male").astype(float).where(sex.notna())
        columns["bleeding_severity"] = pd.Series(
            [schema.bleeding_severity(s, c) for s, c in zip(X["bleeding_score"],
                                                           X["bleeding_scale"], strict=True)],
            index=X.index,
            dtype=float,
        )
        return pd.DataFrame(columns, index=X.index)

    def transform(self, X: pd.DataFrame) -> np.ndarray:
        check_is_fitted(self, "treatments_")
        return self._encode(X).to_numpy(dtype=float)

    def get_feature_names_out(self, input_features: object = None) -> np.ndarray:
        check_is_fitted(self, "feature_names_out_")
        return self.feature_names_out_


def relative_abundances(values: np.ndarray) -> np.ndarray:
    """Closure per row; a row without reads stays all zero rather than NaN (shared with the
    service's compiled path)."""
    totals = values.sum(axis=1, keepdims=True)
    return np.divide(values, totals, out=np.zeros_like(values), where=totals > 0)


def _nonnegative(values: np.ndarray) -> np.ndarray:
    if (values < 0).any():
        raise ValueError("taxon counts must be non-negative")
    return values


def _deepest_rank(level: str, named: bool = True) -> make_column_selector:
    """Aligned taxon columns whose deepest rank is `level` (or, `named=False`, is not)."""
    at_level = rf"(?:^|;){RANK_PREFIXES_OUT[level]}__[^;]*$"
    return make_column_selector(pattern=at_level if named else
                                rf"^(?!.*{at_level}){schema.TAXON_PATTERN.pattern[1:]}")


def feature_steps(
    rank: str = "genus",
    min_prevalence: float = 0.1,
    min_abundance: float = 1e-4,
    pseudocount: float = 1e-5,
) -> list[tuple[str, TransformerMixin]]:
    """The preprocessing shared by every candidate model, as Pipeline steps.

    Each taxonomic rank of `rank` is its own composition (`taxa`, then `taxa_species` for
    `both`): closed, filtered and CLR-transformed on its own, since a genus and its species
    are the same reads twice. Diversity comes from the coarsest rank.
    """
    def taxa() -> Pipeline:
        return Pipeline([
            ("closure", Closure()),
            ("filter", PrevalenceFilter(min_prevalence, min_abundance)),
            ("clr", CLR(pseudocount)),
        ])

    ranks = levels(rank)
    coarsest = TAXON_COLUMNS if len(ranks) == 1 else _deepest_rank(ranks[1], named=False)
    blocks = [("taxa", taxa(), coarsest)] + [
        (f"taxa_{level}", taxa(), _deepest_rank(level)) for level in ranks[1:]]
    features = ColumnTransformer(
        [
            *blocks,
            ("diversity", AlphaDiversity(), coarsest),
            ("clinical", ClinicalEncoder(), CLINICAL_COLUMNS),
        ],
        verbose_feature_names_out=False,
    )
    return [("align", TaxonomyAligner(rank)), ("features", features)]


def feature_schema(model: Any) -> dict[str, object]:
    """What a fitted model (a `ResponseModel` or a pipeline) expects and produces, for the
    registry and the service. `features` are the input features SHAP values are reported on."""
    pipeline: Pipeline = getattr(model, "pipeline_", model)
    aligner: TaxonomyAligner = pipeline.named_steps["align"]
    encoder: ClinicalEncoder = pipeline.named_steps["features"].named_transformers_["clinical"]
    features = [str(f) for f in pipeline.named_steps["blocks"].get_feature_names_out()] if (
        "blocks" in pipeline.named_steps) else [str(f) for f in
                                                pipeline[:-1].get_feature_names_out()]
    clinical = [
        {
            "name": f.name,
            "kind": str(f.kind),
            "unit": f.unit,
            "description": f.description,
            "categories": list(f.categories) if f.categories else None,
            "training_range": encoder.training_ranges_.get(f.name),
        }
        for f in CLINICAL_FIELDS
    ]
    return {
        "rank": aligner.rank,
        "taxa_vocabulary": list(aligner.vocabulary_),
        "taxa_used": [f for f in features if schema.is_taxon(f)],
        "treatments": list(encoder.treatments_),
        "clinical": clinical,
        "features": features,
    }
