"""One training run: cohort -> label -> nested CV of the model search -> final fit -> registry.

Everything is logged to MLflow under one parent run, with one nested run per feature set and
per model family (scored on the same outer folds). The model is registered only after every
other step has succeeded, so a failed or interrupted run leaves a FAILED run in the tracking
store and nothing in the registry.
"""

from __future__ import annotations

import json
import logging
import platform
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import mlflow
import numpy as np
import pandas as pd

from training import plots, registry
from training.card import CardInputs, card_html, card_summary, model_card
from training.cohort import Cohort, depth_report, load_cohort
from training.confounders import confounder_report, confounder_warnings
from training.evaluation import (
    CHAMPION,
    CVConfig,
    NestedResult,
    nested_cross_validate,
    permutation_control,
    shap_stability,
)
from training.explain import ShapExplainer
from training.features import feature_schema, model_input
from training.golden import GOLDEN_KEY, golden_record
from training.model import DEFAULT_FAMILIES, FAMILIES, PRESETS, FeatureConfig
from training.outcomes import DEFAULT_WINDOWS, derive_outcomes, target, without_rare_treatments
from training.schema import SUBJECT_ID
from training.tuning import ModelSearch

log = logging.getLogger(__name__)

MODEL_DESCRIPTION = (
    "Probability of response ({target}, {definition} criteria) of an adult with primary ITP "
    "to a treatment episode, from the gut microbiome and clinical and immune data. Each "
    "version's description is its model card (TRIPOD+AI, STORMS). Research use only.")

# Outer repeats, inner folds and permutations of each preset (docs/evaluation.md).
PRESET_SETTINGS: dict[str, dict[str, int]] = {
    "fast": {"n_repeats": 1, "inner_splits": 3, "permutations": 5},
    "thorough": {"n_repeats": 3, "inner_splits": 5, "permutations": 10},
}


def _versioned_modules() -> list[Any]:
    import shap
    import sklearn
    import skops
    import xgboost

    return [sklearn, xgboost, shap, mlflow, np, pd, skops]


@dataclass(frozen=True)
class TrainConfig:
    data: Path
    experiment: str = "itp-response"
    register: str | None = "itp-response"
    alias: str | None = "champion"
    definition: str = "iwg"
    target: str = "responded"
    preset: str = "fast"
    families: tuple[str, ...] | None = None  # None: the preset's
    min_reads: int = 1000
    features: FeatureConfig = field(default_factory=FeatureConfig)
    ranks: tuple[str, ...] | None = None  # None: the preset's (model.PRESET_RANKS)
    cv: CVConfig = field(default_factory=CVConfig)
    inner_splits: int | None = None  # None: the preset's
    permutations: int | None = None  # None: the preset's
    threshold: str | float = "youden"
    stack: bool = True  # stack a random forest with the chosen model (tuning.ResponseModel)
    windows: dict[str, tuple[int, int]] | None = None  # None: outcomes.DEFAULT_WINDOWS

    def resolved(self) -> TrainConfig:
        """Preset defaults filled in, names checked."""
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose from {PRESETS}")
        families = self.families or DEFAULT_FAMILIES[self.preset]
        unknown = sorted(set(families) - set(FAMILIES))
        if unknown:
            raise ValueError(f"unknown model family {unknown}; choose from {sorted(FAMILIES)}")
        preset = PRESET_SETTINGS[self.preset]
        return TrainConfig(**{
            **self.__dict__, "families": tuple(families),
            "inner_splits": self.inner_splits or preset["inner_splits"],
            "permutations": (preset["permutations"] if self.permutations is None
                             else self.permutations),
        })


@dataclass(frozen=True)
class TrainResult:
    run_id: str
    chosen: dict[str, Any]
    summaries: dict[str, dict[str, float]]
    comparisons: dict[str, dict[str, float]]
    permutation_auroc: list[float]
    model_uri: str
    digest: str
    registered_version: str | None
    warnings: list[str]


def train(config: TrainConfig) -> TrainResult:
    config = config.resolved()
    cohort = load_cohort(config.data, min_reads=config.min_reads)
    outcomes = without_rare_treatments(
        derive_outcomes(cohort.metadata, config.definition, config.windows), cohort.metadata,
        config.cv.n_splits, config.inner_splits or 0)
    metadata = cohort.metadata.loc[outcomes.labels.index]
    responses = outcomes.labels
    y = target(responses, config.target).to_numpy()
    X = model_input(metadata, cohort.counts)
    groups = metadata[SUBJECT_ID].to_numpy()
    if len(outcomes.excluded):
        log.warning("%d episodes excluded from training (excluded_episodes.json): %s",
                    len(outcomes.excluded),
                    outcomes.excluded["reason"].value_counts().head(3).to_dict())
    for line in depth_report(cohort):
        log.warning("%s", line)
    log.info("cohort %s: %d episodes, %d patients, %d responders, %d taxa (%d samples dropped "
             "below min_reads, %d episodes excluded)", cohort.source, len(y),
             len(np.unique(groups)), y.sum(), cohort.counts.shape[1], len(cohort.dropped),
             len(outcomes.excluded))
    search = ModelSearch(families=config.families, features=config.features,
                         preset=config.preset, inner_splits=config.inner_splits,
                         seed=config.cv.seed, threshold=config.threshold, ranks=config.ranks,
                         stack=config.stack)

    confounders = confounder_report(metadata, cohort.counts, y)

    mlflow.set_experiment(config.experiment)
    with mlflow.start_run(run_name=f"train-{config.definition}-{config.target}") as run:
        _log_setup(config, cohort, responses, y, groups)
        _log_dataset(config, cohort, X, y, metadata)
        mlflow.log_params({"n_excluded_episodes": len(outcomes.excluded),
                           "n_unchecked_followup_day": outcomes.unchecked_window,
                           "n_steroid_dependence_assumed": outcomes.dependence_assumed})
        if len(outcomes.excluded):
            mlflow.log_table(outcomes.excluded.rename_axis("sample").reset_index(),
                             "excluded_episodes.json")
        if not confounders.empty:
            mlflow.log_table(confounders, "confounders.json")
        nested = nested_cross_validate(search, X, y, groups, config.cv)
        champion = nested.champion.summary
        stability = shap_stability([f.importance for f in nested.folds])
        _log_nested(nested, stability, X.index)
        log.info("nested CV AUROC %.3f (95%% CI %.3f-%.3f), calibration slope %.2f, "
                 "in-the-large %+.2f", champion["auroc_mean"], champion["auroc_ci_low"],
                 champion["auroc_ci_high"], champion["calibration_slope_mean"],
                 champion["calibration_in_the_large_mean"])
        permuted = (permutation_control(search, X, y, groups, config.cv, config.permutations)
                    if config.permutations else [])
        if permuted:
            mlflow.log_metric("control_permuted_auroc", float(np.mean(permuted)))
            log.info("permuted-label control AUROC %.3f (expect ~0.5; %d permutations by "
                     "patient)", np.mean(permuted), len(permuted))

        final = search.fit(X, y, groups)
        model = final.model_
        chosen = {"family": str(final.best_["family"]),
                  "feature_set": str(final.best_["feature_set"]),
                  "params": dict(final.best_["params"]),
                  "chosen_weight": model.slope_,
                  "stacked_forest_weight": model.companion_slope_}
        warnings = (_warnings(model.flat, chosen, nested) + outcomes.warnings()
                    + confounder_warnings(confounders))
        for warning in warnings:
            log.warning("%s", warning)
        mlflow.set_tags({"chosen_family": chosen["family"],
                         "chosen_feature_set": chosen["feature_set"],
                         "served_model": candidate_name(chosen),  # with the stacked forest
                         "warnings": " | ".join(warnings) or "none"})
        mlflow.log_params({f"chosen.{k}": v for k, v in chosen["params"].items()})
        mlflow.log_metrics({"recalibration_intercept": model.intercept_,
                            "recalibration_slope": model.slope_,
                            "stacked_forest_weight": model.companion_slope_,
                            "decision_threshold": model.threshold_})
        mlflow.log_table(final.results_.assign(params=final.results_["params"].map(json.dumps)),
                         "inner_search.json")
        schema = feature_schema(model) | {"abundance": cohort.abundance,
                                          "profile_source": cohort.profile_source}
        mlflow.log_dict(schema, "feature_schema.json")
        explanation = ShapExplainer(model).explain(X)
        _log_figure(plots.shap_summary_figure(explanation), "shap_summary.png")
        model_info = {
            "candidate": candidate_name(chosen),
            "chosen": chosen,
            "trained_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "definition": config.definition,
            "target": config.target,
            "windows": {t: list(days) for t, days in
                        (DEFAULT_WINDOWS if config.windows is None else config.windows).items()},
            "preset": config.preset,
            "data_fingerprint": cohort.fingerprint,
            "n_episodes": len(y),
            "n_patients": len(np.unique(groups)),
            "cv_metrics": champion,
            "microbiome_added_value": nested.comparisons.get("combined-vs-clinical", {}),
            "calibration": {"intercept": model.intercept_, "slope": model.slope_,
                            "forest_slope": model.companion_slope_},
            "threshold": model.threshold_,
            "warnings": warnings,
            "feature_schema": schema,
            GOLDEN_KEY: golden_record(model, X),  # re-scored by the service before it serves
        }
        info = registry.log_model(model, X, model_info)
        with tempfile.TemporaryDirectory() as tmp:
            sha256 = registry.digest(registry.download(info.model_uri, Path(tmp)))
        mlflow.set_tag("model_sha256", sha256)
        card = model_card(CardInputs(
            name=config.register or config.experiment, run_id=run.info.run_id,
            trained_at=model_info["trained_at"], definition=config.definition,
            target=config.target, preset=config.preset, windows=config.windows, cohort=cohort,
            outcomes=outcomes, metadata=metadata, y=y, nested=nested, chosen=chosen,
            model=model, feature_schema=schema, warnings=warnings, permuted_auroc=permuted,
            min_reads=config.min_reads))
        mlflow.log_text(card, "model_card.md")
        mlflow.log_text(card_html(card, f"Model card: {config.register}"), "model_card.html")
        version = None
        if config.register:
            version = registry.register(
                info.model_uri, config.register, config.alias, sha256,
                description=card_summary(card, f"runs:/{run.info.run_id}/model_card.md"),
                model_description=MODEL_DESCRIPTION.format(definition=config.definition,
                                                           target=config.target))
            mlflow.set_tag("registered_version", f"{config.register}/{version.version}")
            log.info("registered %s version %s%s", config.register, version.version,
                     f" as @{config.alias}" if config.alias else "")
    return TrainResult(
        run_id=run.info.run_id,
        chosen=chosen,
        summaries={name: r.summary for name, r in nested.results.items()},
        comparisons=nested.comparisons,
        permutation_auroc=permuted,
        model_uri=info.model_uri,
        digest=sha256,
        registered_version=str(version.version) if version else None,
        warnings=warnings,
    )


def _warnings(flat: bool, chosen: dict[str, Any], nested: NestedResult) -> list[str]:
    """What a user must not miss: a constant model, and whether the microbiome helped."""
    warnings = []
    if flat:
        warnings.append("the model has no out-of-fold discrimination (recalibration slope "
                        "~0): it predicts about the same probability for everyone")
    gain = nested.comparisons.get("combined-vs-clinical")
    if chosen["feature_set"] == "clinical":
        warnings.append("the microbiome did not improve inner-CV AUROC: the chosen model "
                        "uses clinical and immune data only")
    elif gain and gain["ci_low"] <= 0:
        warnings.append(f"microbiome added value not established: combined minus "
                        f"clinical-only AUROC {gain['auroc_difference']:+.3f} "
                        f"(95% CI {gain['ci_low']:+.3f} to {gain['ci_high']:+.3f})")
    return warnings


def candidate_name(chosen: dict[str, Any]) -> str:
    """What is served, in a few words: the chosen family (feature set), and the stacked
    forest when it has a weight; the forest alone when the stack gave the chosen model none."""
    name = f"{chosen['family']} ({chosen['feature_set']})"
    if chosen.get("stacked_forest_weight", 0.0) <= 0:
        return name
    if chosen.get("chosen_weight", 1.0) <= 0:
        return f"stacked forest ({chosen['feature_set']}; {chosen['family']} weight 0)"
    return f"{name} + stacked forest"


def _log_setup(
    config: TrainConfig, cohort: Cohort, responses: pd.Series, y: np.ndarray, groups: np.ndarray
) -> None:
    params: dict[str, Any] = {
        "data": str(config.data),
        "definition": config.definition,
        "target": config.target,
        "preset": config.preset,
        "families": ",".join(config.families or ()),
        "inner_splits": config.inner_splits,
        "permutations": config.permutations,
        "threshold_policy": config.threshold,
        "stack": config.stack,
        "min_reads": config.min_reads,
        **{f"features.{k}": v for k, v in asdict(config.features).items()},
        **{f"cv.{k}": v for k, v in asdict(config.cv).items()},
        "n_episodes": len(y),
        "n_patients": len(np.unique(groups)),
        "n_responders": int(y.sum()),
        "n_taxa_in_table": cohort.counts.shape[1],
        "n_dropped_samples": len(cohort.dropped),
    }
    mlflow.log_params(params)
    mlflow.set_tags({
        "data_fingerprint": cohort.fingerprint,
        "python": platform.python_version(),
        **{f"version.{m.__name__}": m.__version__ for m in _versioned_modules()},
    })
    _log_environment()
    counts = responses.value_counts().reindex(["CR", "R", "NR"], fill_value=0)
    by_treatment = pd.crosstab(cohort.metadata.loc[responses.index, "treatment"], responses)
    mlflow.log_dict({"responses": counts.to_dict(),
                     "by_treatment": by_treatment.to_dict(orient="index"),
                     "dropped_samples": [list(d) for d in cohort.dropped]},
                    "cohort_summary.json")


def _log_environment() -> None:
    """Every installed distribution at its version, as `environment.txt`: what this run trained
    with, to compare with constraints.txt (the model's own requirements.txt pins the few
    packages that loading it needs)."""
    from importlib.metadata import distributions

    installed = {f"{d.metadata['Name']}=={d.version}" for d in distributions()
                 if d.metadata["Name"]}
    mlflow.log_text("".join(f"{line}\n" for line in sorted(installed, key=str.lower)),
                    "environment.txt")


def _log_dataset(config: TrainConfig, cohort: Cohort, X: pd.DataFrame, y: np.ndarray,
                 metadata: pd.DataFrame) -> None:
    """The cohort as the run's training dataset (schema, digest, source: not the rows), and
    the tags a reviewer filters runs on."""
    dataset = registry.cohort_dataset(X, y, config.target, config.data, cohort.fingerprint)
    mlflow.log_input(dataset, context="training")
    treatments = sorted(metadata["treatment"].unique())
    mlflow.set_tags({
        "definition": config.definition, "target": config.target,
        "treatments": ",".join(treatments), "n_episodes": str(len(y)),
        "n_patients": str(metadata[SUBJECT_ID].nunique()), "preset": config.preset,
        "profile_source": cohort.profile_source, "abundance": cohort.abundance,
        "mlflow.note.content": (
            f"Nested CV of the `{config.preset}` model search on `{Path(config.data).name}` "
            f"({len(y)} episodes, {metadata[SUBJECT_ID].nunique()} patients; "
            f"{', '.join(treatments)}); outcome `{config.target}` by `{config.definition}`. "
            "Nested runs: the best model per feature set and per family on the same outer "
            "folds. Artifacts: model card, comparison table, ROC/PR/calibration/decision "
            "curves, SHAP summary and stability."),
    })


def comparison_table(nested: NestedResult) -> pd.DataFrame:
    """One row per scored model (champion procedure, feature sets, families)."""
    rows = []
    for name, result in nested.results.items():
        s = result.summary
        rows.append({"model": name, "auroc": s["auroc_mean"], "auroc_ci_low": s["auroc_ci_low"],
                     "auroc_ci_high": s["auroc_ci_high"], "auprc": s["auprc_mean"],
                     "brier": s["brier_mean"], "calibration_slope": s["calibration_slope_mean"],
                     "calibration_in_the_large": s["calibration_in_the_large_mean"]})
    return pd.DataFrame(rows)


def _log_nested(nested: NestedResult, stability: dict[str, float], index: pd.Index) -> None:
    """Champion metrics on the parent run; one nested run per feature set and family."""
    champion = nested.champion
    mlflow.log_metrics({f"cv_{k}": v for k, v in champion.summary.items()})
    mlflow.log_metrics(stability)
    for name, comparison in nested.comparisons.items():
        mlflow.log_metrics({f"{name.replace('-', '_')}_{k}": v for k, v in comparison.items()})
    mlflow.log_table(comparison_table(nested), "model_comparison.json")
    folds = pd.DataFrame([{
        "repeat": f.repeat, "fold": f.fold, "family": f.family, "feature_set": f.feature_set,
        "params": json.dumps(f.params), "inner_score": f.inner_score,
        "recalibration_slope": f.slope, "stacked_forest_weight": f.forest_slope,
        "threshold": f.threshold,
    } for f in nested.folds])
    mlflow.log_table(folds, "outer_fold_choices.json")
    mlflow.log_text(champion.predictions(index).to_csv(sep="\t"),
                    "cv_predictions.tsv")
    for figure, name in (
        (plots.roc_figure(champion, "nested CV"), "roc_curve.png"),
        (plots.pr_figure(champion, "nested CV"), "pr_curve.png"),
        (plots.calibration_figure(champion, "nested CV"), "calibration_curve.png"),
        (plots.decision_curve_figure(champion, "nested CV"), "decision_curve.png"),
        (plots.comparison_figure(nested), "model_comparison.png"),
        (plots.shap_stability_figure([f.importance for f in nested.folds], stability),
         "shap_stability.png"),
    ):
        _log_figure(figure, name)
    for name, result in nested.results.items():
        if name == CHAMPION:
            continue
        with mlflow.start_run(run_name=name, nested=True):
            kind, _, value = name.partition(":")
            mlflow.set_tags({kind: value, "mlflow.note.content":
                             f"Best {kind} '{value}' by inner CV, scored on the same outer "
                             "folds as the champion (uncalibrated)."})
            mlflow.log_metrics({f"cv_{k}": v for k, v in result.summary.items()})
            _log_figure(plots.roc_figure(result, name), "roc_curve.png")


def _log_figure(figure: plt.Figure, name: str) -> None:
    mlflow.log_figure(figure, name)
    plt.close(figure)


def summary_json(result: TrainResult) -> str:
    return json.dumps(asdict(result), indent=2, default=str)
