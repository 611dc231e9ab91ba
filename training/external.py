"""External validation: a registered model scored on a cohort it never saw.

Cross-validation estimates how the procedure does on new patients from the same source; a
reviewer asks how the fitted model does somewhere else. This scores the registered version
as it is served (the digest-checked model, its recalibration and threshold), with the same
metrics and patient-bootstrap CIs as training, plus what differs between sites: calibration
in the large, per-treatment and per-subgroup performance, and the share of reads whose taxa
the model knows. The run is logged to MLflow with the cohort as an evaluation dataset and its
metrics linked to the model version's logged model, so the UI shows them beside it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import mlflow
import numpy as np
import pandas as pd

from training import plots, registry
from training.cohort import Cohort, depth_report, load_cohort
from training.evaluation import CVConfig, CVResult, net_benefit, summarise
from training.features import feature_schema, model_input
from training.outcomes import (
    REASON,
    derive_outcomes,
    target,
    without_unknown_treatments,
)
from training.schema import SUBJECT_ID
from training.subgroups import subgroup_table

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class ExternalResult:
    run_id: str
    model: str
    summary: dict[str, float]
    subgroups: pd.DataFrame
    taxa_matched: dict[str, float]
    net_benefit_at_threshold: dict[str, float]
    n_episodes: int
    n_patients: int
    excluded: int
    notes: list[str] = field(default_factory=list)


def evaluate_external(model_uri: str, data: Path, *, definition: str | None = None,
                      target_name: str | None = None, min_reads: int = 1000,
                      n_bootstrap: int = 1000, seed: int = 7,
                      experiment: str = "itp-response-validation") -> ExternalResult:
    """Score `model_uri` on the cohort in `data` and log an MLflow evaluation run."""
    stored = registry.load(model_uri)
    definition = definition or stored.metadata.get("definition", "iwg")
    target_name = target_name or stored.metadata.get("target", "responded")
    cohort = load_cohort(data, min_reads=min_reads)
    # the response windows the model was trained with, so labels mean the same thing
    outcomes = without_unknown_treatments(
        derive_outcomes(cohort.metadata, definition, stored.metadata.get("windows")),
        cohort.metadata, feature_schema(stored.model)["treatments"])
    if outcomes.labels.empty:
        raise ValueError(f"{data}: no episode can be scored; excluded: "
                         f"{outcomes.excluded[REASON].value_counts().head(3).to_dict()}")
    metadata = cohort.metadata.loc[outcomes.labels.index]
    y = target(outcomes.labels, target_name).to_numpy()
    if not 0 < y.sum() < len(y):
        raise ValueError(f"{data}: every episode has the same outcome ({int(y.sum())} of "
                         f"{len(y)} responded); discrimination cannot be estimated")
    X = model_input(metadata, cohort.counts)
    groups = metadata[SUBJECT_ID].to_numpy()
    model = stored.model
    p = model.predict_proba(X)[:, 1]
    result = CVResult(y, groups, p[None, :], summarise(
        y, groups, p[None, :], CVConfig(n_bootstrap=n_bootstrap, seed=seed),
        calibration_ci=True))
    matched = model.pipeline_.named_steps["align"].matched_share(X)
    taxa_matched = {"median": float(matched.median()), "min": float(matched.min())}
    subgroups = subgroup_table(metadata, y, p)
    at = np.array([model.threshold_])
    curve = net_benefit(y, p, at)
    benefit = {"threshold": float(model.threshold_), "model": float(curve["model"][0]),
               "treat_all": float(curve["treat_all"][0])}
    notes = depth_report(cohort)
    for reason, n in outcomes.excluded[REASON].value_counts().items():
        notes.append(f"{n} episode(s) excluded: {reason}")
    if stored.metadata.get("feature_schema", {}).get("abundance", cohort.abundance) \
            != cohort.abundance:
        notes.append(f"the model was trained on {stored.metadata['feature_schema']['abundance']}"
                     f" profiles; this cohort has {cohort.abundance} ones")
    if taxa_matched["median"] < 0.8:
        notes.append(f"only {100 * taxa_matched['median']:.0f}% of a typical sample's reads "
                     "fall on taxa the model knows: check the taxonomy (docs/data-format.md)")

    mlflow.set_experiment(experiment)
    version = stored.version
    with mlflow.start_run(run_name=f"evaluate-{stored.name}-v{version}-{Path(data).name}",
                          description=_description(stored, cohort, len(y))) as run:
        dataset = registry.cohort_dataset(X, y, target_name, Path(data), cohort.fingerprint)
        mlflow.log_input(dataset, context="evaluation")
        mlflow.set_tags({"model_uri": model_uri, "registered_model": stored.name,
                         "registered_version": str(version), "model_sha256": stored.digest,
                         "data_fingerprint": cohort.fingerprint, "definition": definition,
                         "target": target_name, "kind": "external_validation"})
        mlflow.log_params({"n_episodes": len(y), "n_patients": len(np.unique(groups)),
                           "n_responders": int(y.sum()), "n_excluded": len(outcomes.excluded),
                           "n_dropped_samples": len(cohort.dropped), "min_reads": min_reads})
        metrics = {f"external_{k}": v for k, v in result.summary.items() if k != "n_repeats"}
        metrics |= {f"taxa_matched_{k}": v for k, v in taxa_matched.items()}
        metrics |= {f"net_benefit_{k}": v for k, v in benefit.items() if k != "threshold"}
        mlflow.log_metrics(metrics)
        _link_to_model(stored, metrics, dataset)
        mlflow.log_table(subgroups, "subgroups.json")
        mlflow.log_text(pd.DataFrame({"responded": y, "probability": p},
                                     index=X.index).to_csv(sep="\t"), "predictions.tsv")
        for figure, name in (
            (plots.roc_figure(result, "external validation"), "roc_curve.png"),
            (plots.calibration_figure(result, "external validation"), "calibration_curve.png"),
            (plots.decision_curve_figure(result, "external validation"), "decision_curve.png"),
        ):
            mlflow.log_figure(figure, name)
            plt.close(figure)
    for note in notes:
        log.warning("%s", note)
    return ExternalResult(run.info.run_id, model_uri, result.summary, subgroups, taxa_matched,
                          benefit, len(y), len(np.unique(groups)), len(outcomes.excluded), notes)


def _link_to_model(stored: registry.StoredModel, metrics: dict[str, float],
                   dataset: Any) -> None:
    """Metrics on the version's logged model too, so the model page lists this cohort."""
    if stored.version is None or not stored.source.startswith("models:/"):
        return
    version = mlflow.MlflowClient().get_model_version(stored.name, stored.version)
    model_id = registry.logged_model_id(version)
    if model_id:
        mlflow.log_metrics(metrics, model_id=model_id, dataset=dataset)


def _description(stored: registry.StoredModel, cohort: Cohort, n: int) -> str:
    return (f"External validation of {stored.name} version {stored.version} "
            f"(sha256 {stored.digest[:12]}) on {cohort.source.name}: {n} episodes, "
            f"{cohort.profile_source} profiles ({cohort.abundance}).")
