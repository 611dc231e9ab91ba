"""One training run: cohort -> label -> features -> cross-validated candidates -> registry.

Everything is logged to MLflow under one parent run (one nested run per candidate). The
model is registered only after every other step has succeeded, so a failed or interrupted
run leaves a FAILED run in the tracking store and nothing in the registry.
"""

from __future__ import annotations

import json
import logging
import platform
import tempfile
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import mlflow
import numpy as np
import pandas as pd

from training import registry
from training.cohort import Cohort, load_cohort
from training.evaluation import CVConfig, CVResult, cross_validate
from training.explain import ShapExplainer
from training.features import feature_schema, model_input
from training.model import CANDIDATES, FeatureConfig
from training.outcomes import response_labels, target
from training.plots import calibration_figure, roc_figure, shap_summary_figure

log = logging.getLogger(__name__)



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
    candidates: tuple[str, ...] = ("xgboost", "logistic")
    min_reads: int = 1000
    features: FeatureConfig = field(default_factory=FeatureConfig)
    cv: CVConfig = field(default_factory=CVConfig)


@dataclass(frozen=True)
class TrainResult:
    run_id: str
    chosen: str
    summaries: dict[str, dict[str, float]]
    model_uri: str
    digest: str
    registered_version: str | None


def train(config: TrainConfig) -> TrainResult:
    unknown = sorted(set(config.candidates) - set(CANDIDATES))
    if unknown:
        raise ValueError(f"unknown candidate {unknown}; choose from {sorted(CANDIDATES)}")
    cohort = load_cohort(config.data, min_reads=config.min_reads)
    responses = response_labels(cohort.metadata, config.definition)
    y = target(responses, config.target).to_numpy()
    X = model_input(cohort.metadata, cohort.counts)
    groups = cohort.groups.to_numpy()
    log.info("cohort %s: %d episodes, %d patients, %d responders, %d taxa",
             cohort.source, len(y), len(np.unique(groups)), y.sum(), cohort.counts.shape[1])

    mlflow.set_experiment(config.experiment)
    with mlflow.start_run(run_name=f"train-{config.definition}-{config.target}") as run:
        _log_setup(config, cohort, responses, y, groups)
        results = {name: _evaluate(name, config, X, y, groups) for name in config.candidates}
        chosen = max(results, key=lambda name: results[name].summary["auroc_mean"])
        log.info("chosen candidate: %s", chosen)
        mlflow.set_tag("chosen_candidate", chosen)
        mlflow.log_metrics({f"cv_{k}": v for k, v in results[chosen].summary.items()})
        control = _shuffled_label_control(chosen, config, X, y, groups)
        mlflow.log_metric("control_shuffled_auroc", control)
        _log_figures(results[chosen], f"{chosen} (chosen)")
        mlflow.log_text(results[chosen].predictions(X.index).to_csv(sep="\t"),
                        "cv_predictions.tsv")

        final = CANDIDATES[chosen].build(config.features, config.cv.seed).fit(X, y)
        schema = feature_schema(final)
        mlflow.log_dict(schema, "feature_schema.json")
        explanation = ShapExplainer(final).explain(X)
        _log_figure(shap_summary_figure(explanation), "shap_summary.png")
        metadata = {
            "candidate": chosen,
            "trained_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "definition": config.definition,
            "target": config.target,
            "data_fingerprint": cohort.fingerprint,
            "n_episodes": len(y),
            "n_patients": len(np.unique(groups)),
            "cv_metrics": results[chosen].summary,
            "feature_schema": schema,
        }
        info = registry.log_model(final, X, metadata)
        with tempfile.TemporaryDirectory() as tmp:
            sha256 = registry.digest(registry.download(info.model_uri, Path(tmp)))
        mlflow.set_tag("model_sha256", sha256)
        version = None
        if config.register:
            version = registry.register(info.model_uri, config.register, config.alias, sha256)
            mlflow.set_tag("registered_version", f"{config.register}/{version.version}")
            log.info("registered %s version %s%s", config.register, version.version,
                     f" as @{config.alias}" if config.alias else "")
    return TrainResult(
        run_id=run.info.run_id,
        chosen=chosen,
        summaries={name: r.summary for name, r in results.items()},
        model_uri=info.model_uri,
        digest=sha256,
        registered_version=str(version.version) if version else None,
    )


def _log_setup(
    config: TrainConfig, cohort: Cohort, responses: pd.Series, y: np.ndarray, groups: np.ndarray
) -> None:
    params: dict[str, Any] = {
        "data": str(config.data),
        "definition": config.definition,
        "target": config.target,
        "candidates": ",".join(config.candidates),
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
    counts = responses.value_counts().reindex(["CR", "R", "NR"], fill_value=0)
    by_treatment = pd.crosstab(cohort.metadata["treatment"], responses)
    mlflow.log_dict({"responses": counts.to_dict(),
                     "by_treatment": by_treatment.to_dict(orient="index"),
                     "dropped_samples": [list(d) for d in cohort.dropped]},
                    "cohort_summary.json")


def _evaluate(
    name: str, config: TrainConfig, X: pd.DataFrame, y: np.ndarray, groups: np.ndarray
) -> CVResult:
    pipeline = CANDIDATES[name].build(config.features, config.cv.seed)
    with mlflow.start_run(run_name=name, nested=True):
        estimator = pipeline[-1]
        mlflow.log_params({f"model.{k}": v for k, v in estimator.get_params().items()
                           if v is not None and not callable(v)})
        mlflow.set_tags({"candidate": name,
                         "mlflow.note.content": CANDIDATES[name].description})
        result = cross_validate(pipeline, X, y, groups, config.cv)
        mlflow.log_metrics({f"cv_{k}": v for k, v in result.summary.items()})
        _log_figures(result, name)
        s = result.summary
        log.info("%-9s AUROC %.3f (95%% CI %.3f-%.3f)  AUPRC %.3f  Brier %.3f", name,
                 s["auroc_mean"], s["auroc_ci_low"], s["auroc_ci_high"], s["auprc_mean"],
                 s["brier_mean"])
    return result


def _shuffled_label_control(
    name: str, config: TrainConfig, X: pd.DataFrame, y: np.ndarray, groups: np.ndarray,
    n_permutations: int = 3,
) -> float:
    """CV AUROC of the chosen pipeline with shuffled labels: must be ~0.5, else it leaks.

    A value far from 0.5 on a real cohort means information about the label reaches the
    model by another route. One permutation spreads 0.40-0.60 on a cohort of a few hundred
    (docs/benchmarks.md), so the mean of a few is logged.
    """
    control = replace(config.cv, n_repeats=1, n_bootstrap=100)
    pipeline = CANDIDATES[name].build(config.features, config.cv.seed)
    rng = np.random.default_rng(config.cv.seed)
    aurocs = [
        cross_validate(pipeline, X, rng.permutation(y), groups, control).summary["auroc_mean"]
        for _ in range(n_permutations)
    ]
    log.info("shuffled-label control AUROC %.3f (expect ~0.5; %d permutations)",
             np.mean(aurocs), n_permutations)
    return float(np.mean(aurocs))


def _log_figures(result: CVResult, title: str) -> None:
    _log_figure(roc_figure(result, title), "roc_curve.png")
    _log_figure(calibration_figure(result, title), "calibration_curve.png")


def _log_figure(figure: plt.Figure, name: str) -> None:
    mlflow.log_figure(figure, name)
    plt.close(figure)


def summary_json(result: TrainResult) -> str:
    return json.dumps(asdict(result), indent=2, default=str)
