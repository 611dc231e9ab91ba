"""`itp-train`: simulate a cohort, validate one, train and register a model, export a bundle."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import click

from training.model import FAMILIES, PRESETS
from training.outcomes import DEFINITIONS, TARGETS
from training.schema import FEATURE_RANKS

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
T = TypeVar("T")


def _tracking(uri: str) -> None:
    import mlflow

    os.environ["MLFLOW_TRACKING_URI"] = uri
    mlflow.set_tracking_uri(uri)


tracking_option = click.option(
    "--tracking-uri",
    envvar="MLFLOW_TRACKING_URI",
    default=DEFAULT_TRACKING_URI,
    show_default=True,
    help="MLflow tracking and registry store (env MLFLOW_TRACKING_URI).",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Show debug logging.")
def main(verbose: bool) -> None:
    """Train and register models of ITP treatment response (microbiome + clinical data)."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    # No usage reports leave a machine that holds patient data unless asked for; the image
    # sets the same (Dockerfile)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("alembic", "mlflow", "urllib3", "matplotlib", "shap", "numba"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@main.command()
@click.option("--n-patients", type=click.IntRange(min=10), default=400, show_default=True)
@click.option("--seed", type=int, default=7, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="Directory to write the cohort into.")
@click.option("--scenario", default="default", show_default=True,
              help="Named scenario (see docs/simulator.md), e.g. default, null, strong.")
@click.option("--signal", type=float, default=None,
              help="Override the scenario's signal strength (0 = no signal).")
def simulate(n_patients: int, seed: int, out: Path, scenario: str, signal: float | None) -> None:
    """Write a synthetic cohort (metadata.tsv, feature-table.tsv, truth.json, truth.tsv)."""
    from dataclasses import replace

    from training.simulate import SCENARIOS, simulate, write_cohort

    if scenario not in SCENARIOS:
        raise click.BadParameter(f"choose from {sorted(SCENARIOS)}", param_hint="--scenario")
    chosen = SCENARIOS[scenario] if signal is None else replace(SCENARIOS[scenario],
                                                                 signal=signal)
    cohort = simulate(n_patients, seed, chosen)
    write_cohort(cohort, out)
    click.echo(f"wrote {out}/ ({n_patients} patients, scenario {scenario}, seed {seed})")


@main.command()
@click.option("--data", type=click.Path(path_type=Path, exists=True, file_okay=False),
              required=True, help="Cohort directory (docs/data-format.md).")
@click.option("--min-reads", type=click.IntRange(min=0), default=1000, show_default=True)
@click.option("--definition", type=click.Choice(DEFINITIONS), default="iwg", show_default=True)
def validate(data: Path, min_reads: int, definition: str) -> None:
    """Check a cohort against the data contract and summarise it, without training."""
    from training.cohort import depth_report, load_cohort
    from training.outcomes import derive_outcomes

    cohort = _or_exit(lambda: load_cohort(data, min_reads=min_reads))
    outcomes = _or_exit(lambda: derive_outcomes(cohort.metadata, definition))
    click.echo(f"{data}: valid. {len(cohort.metadata)} episodes, "
               f"{cohort.groups.nunique()} patients, {cohort.counts.shape[1]} taxa "
               f"({cohort.profile_source}, {cohort.abundance}), "
               f"{len(cohort.dropped)} samples dropped.")
    for line in depth_report(cohort):
        click.echo(line)
    click.echo(f"responses ({definition}): {outcomes.labels.value_counts().to_dict()}")
    if len(outcomes.excluded):
        click.echo(f"excluded from training: {len(outcomes.excluded)} episodes that cannot "
                   "show a response:")
        for sample, reason in outcomes.excluded["reason"].head(20).items():
            click.echo(f"  {sample}: {reason}")
    for warning in outcomes.warnings():
        click.echo(warning)
    click.echo(f"fingerprint: {cohort.fingerprint}")


@main.command()
@click.option("--data", type=click.Path(path_type=Path, exists=True, file_okay=False),
              required=True, help="Cohort directory (docs/data-format.md).")
@click.option("--experiment", default="itp-response", show_default=True)
@click.option("--register", default="itp-response", show_default=True,
              help="Registered model name; empty string to skip registration.")
@click.option("--alias", default="champion", show_default=True,
              help="Alias to point at the new version; empty string for none.")
@click.option("--definition", type=click.Choice(DEFINITIONS), default="iwg", show_default=True,
              help="Response definition used to derive the label.")
@click.option("--target", type=click.Choice(TARGETS), default="responded", show_default=True)
@click.option("--preset", type=click.Choice(PRESETS), default="fast", show_default=True,
              help="fast: linear family, 5x1 outer x 3 inner folds, 5 permutations; thorough: "
                   "linear + xgboost + random forest, 5x3 outer x 5 inner folds, 10 "
                   "permutations.")
@click.option("--families", default=None,
              help="Comma-separated model families to search (default: the preset's); "
                   f"from {', '.join(FAMILIES)}.")
@click.option("--splits", type=click.IntRange(min=2), default=5, show_default=True,
              help="Outer folds.")
@click.option("--repeats", type=click.IntRange(min=1), default=None,
              help="Outer repeats (default: the preset's).")
@click.option("--inner-splits", type=click.IntRange(min=2), default=None,
              help="Inner folds for tuning and recalibration (default: the preset's).")
@click.option("--permutations", type=click.IntRange(min=0), default=None,
              help="Label permutations by patient through the nested procedure "
                   "(default: the preset's; 0 to skip).")
@click.option("--threshold", default="youden", show_default=True,
              help="Decision threshold policy for the served label: 'youden' (chosen on "
                   "out-of-fold predictions) or a fixed probability such as 0.5.")
@click.option("--bootstrap", type=click.IntRange(min=100), default=1000, show_default=True,
              help="Patient-level bootstrap resamples for the 95% CIs.")
@click.option("--seed", type=int, default=7, show_default=True)
@click.option("--jobs", type=click.IntRange(min=1), default=1, show_default=True,
              help="Outer folds fitted in parallel.")
@click.option("--min-reads", type=click.IntRange(min=0), default=1000, show_default=True)
@click.option("--rank", "ranks", type=click.Choice(FEATURE_RANKS), multiple=True,
              help="Taxonomic rank of the microbiome features (repeatable: the inner CV "
                   "chooses among them; 'both': genus and species side by side; default: "
                   "genus and species, and both with --preset thorough).")
@click.option("--min-prevalence", type=click.FloatRange(0, 1), default=0.1, show_default=True)
@click.option("--response-window", "response_windows", multiple=True, metavar="TREATMENT=LO-HI",
              help="Days after treatment start within which the response assessment must "
                   "fall, e.g. corticosteroid=7-30 (repeatable; overrides that treatment's "
                   "default, docs/data-format.md). Episodes outside are excluded.")
@click.option("--no-stack", "no_stack", is_flag=True,
              help="Serve the chosen model alone, without the random forest stacked with it "
                   "(docs/evaluation.md).")
@click.option("--missing-indicators", is_flag=True,
              help="Add a missing-value indicator for every field with missing values to "
                   "the linear model (the penalty keeps those that help out of fold). Use it "
                   "only when missingness is informative (off by default).")
@click.option("--dask-scheduler", default=None, metavar="ADDRESS",
              help="Run the CV and tuning fits on a Dask cluster, e.g. tcp://host:8786 "
                   "(workers need this package; pip install 'itp-response[dask]').")
@click.option("--export", "export_to", type=click.Path(path_type=Path), default=None,
              help="Also write the registered model as a local bundle here.")
@tracking_option
def train(
    data: Path, experiment: str, register: str, alias: str, definition: str, target: str,
    preset: str, families: str | None, splits: int, repeats: int | None,
    inner_splits: int | None, permutations: int | None, threshold: str, bootstrap: int,
    seed: int, jobs: int, min_reads: int, ranks: tuple[str, ...], min_prevalence: float,
    response_windows: tuple[str, ...], no_stack: bool, missing_indicators: bool,
    dask_scheduler: str | None,
    export_to: Path | None, tracking_uri: str,
) -> None:
    """Nested CV of the model search, refit on all data, log and register the champion."""
    from dataclasses import replace

    from training.compute import dask_backend
    from training.evaluation import CVConfig
    from training.model import FeatureConfig
    from training.registry import export_bundle
    from training.train import PRESET_SETTINGS, TrainConfig, TrainResult, summary_json
    from training.train import train as run_training

    if export_to and not register:
        raise click.UsageError("--export needs a registered model: do not empty --register")
    policy: str | float = threshold
    if threshold != "youden":
        try:
            policy = float(threshold)
        except ValueError:
            raise click.BadParameter("'youden' or a probability", param_hint="--threshold"
                                     ) from None
        if not 0 < policy < 1:
            raise click.BadParameter("must be between 0 and 1", param_hint="--threshold")
    _tracking(tracking_uri)
    config = TrainConfig(
        data=data, experiment=experiment, register=register or None, alias=alias or None,
        definition=definition, target=target, preset=preset,
        families=tuple(f.strip() for f in families.split(",") if f.strip()) if families
        else None,
        min_reads=min_reads,
        ranks=ranks or None,
        features=FeatureConfig(min_prevalence=min_prevalence,  # the rank: one per search
                               missing_indicators=missing_indicators),
        cv=CVConfig(n_splits=splits,
                    n_repeats=repeats or PRESET_SETTINGS[preset]["n_repeats"],
                    n_bootstrap=bootstrap, seed=seed, n_jobs=jobs),
        inner_splits=inner_splits, permutations=permutations, threshold=policy,
        windows=_windows(response_windows), stack=not no_stack,
    )
    def on_cluster() -> TrainResult:
        with dask_backend(dask_scheduler) as cluster_jobs:
            cv = replace(config.cv, n_jobs=cluster_jobs) if cluster_jobs else config.cv
            return run_training(replace(config, cv=cv))

    result = _or_exit(on_cluster)
    if export_to:
        version = f"models:/{register}/{result.registered_version}"
        click.echo(f"exported {version} to {export_bundle(version, export_to)}", err=True)
    click.echo(summary_json(result))


@main.command()
@click.option("--model", "model_uri", default="models:/itp-response@champion", show_default=True,
              help="Registered model: models:/<name>@<alias> or models:/<name>/<version>.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("models/itp-response"),
              show_default=True)
@click.option("--sign-key", type=click.Path(path_type=Path, exists=True, dir_okay=False),
              default=None, help="PEM Ed25519 private key: sign the bundle, for services "
              "with ITP_BUNDLE_PUBLIC_KEY (docs: README, Security).")
@tracking_option
def export(model_uri: str, out: Path, sign_key: Path | None, tracking_uri: str) -> None:
    """Write a registered model as a local bundle the service can load without MLflow."""
    from training.registry import export_bundle

    _tracking(tracking_uri)
    click.echo(f"exported {model_uri} to "
               f"{_or_exit(lambda: export_bundle(model_uri, out, sign_key))}")


@main.command()
@click.option("--model", "model_uri", default="models:/itp-response@champion", show_default=True,
              help="Registered model (models:/<name>@<alias> or /<version>) or a bundle.")
@click.option("--data", type=click.Path(path_type=Path, exists=True, file_okay=False),
              required=True, help="An independent cohort directory (docs/data-format.md).")
@click.option("--definition", type=click.Choice(DEFINITIONS), default=None,
              help="Response definition (default: the one the model was trained on).")
@click.option("--experiment", default="itp-response-validation", show_default=True)
@click.option("--min-reads", type=click.IntRange(min=0), default=1000, show_default=True)
@click.option("--bootstrap", type=click.IntRange(min=100), default=1000, show_default=True,
              help="Patient-level bootstrap resamples for the 95% CIs.")
@click.option("--seed", type=int, default=7, show_default=True)
@tracking_option
def evaluate(model_uri: str, data: Path, definition: str | None, experiment: str,
             min_reads: int, bootstrap: int, seed: int, tracking_uri: str) -> None:
    """Validate a registered model on a cohort it never saw (docs/evaluation.md)."""
    import json
    from dataclasses import asdict

    from training.external import evaluate_external

    _tracking(tracking_uri)
    result = _or_exit(lambda: evaluate_external(
        model_uri, data, definition=definition, min_reads=min_reads, n_bootstrap=bootstrap,
        seed=seed, experiment=experiment))
    s = result.summary
    click.echo(f"{model_uri} on {data}: AUROC {s['auroc_mean']:.3f} "
               f"({s['auroc_ci_low']:.3f}-{s['auroc_ci_high']:.3f}), calibration slope "
               f"{s['calibration_slope_mean']:.2f}, in-the-large "
               f"{s['calibration_in_the_large_mean']:+.2f}; reads on known taxa "
               f"{100 * result.taxa_matched['median']:.0f}% (median)", err=True)
    payload = asdict(result) | {"subgroups": result.subgroups.to_dict(orient="records")}
    click.echo(json.dumps(payload, indent=2, default=str))


def _windows(options: tuple[str, ...]) -> dict[str, tuple[int, int]] | None:
    """TREATMENT=LO-HI options -> the default windows with those treatments replaced."""
    from training.outcomes import DEFAULT_WINDOWS

    if not options:
        return None
    windows = dict(DEFAULT_WINDOWS)
    for option in options:
        treatment, _, days = option.partition("=")
        low, _, high = days.partition("-")
        if not (low.strip().isdigit() and high.strip().isdigit()):
            raise click.BadParameter(f"{option!r}: expected TREATMENT=LO-HI, e.g. "
                                     "corticosteroid=7-30", param_hint="--response-window")
        windows[treatment.strip()] = (int(low), int(high))
    return windows


def _or_exit(action: Callable[[], T]) -> T:
    """Expected failures (bad data, bad options) -> one clear line, not a traceback."""
    from mlflow.exceptions import MlflowException

    from training.cohort import CohortError
    from training.compute import ComputeError

    try:
        return action()
    except (CohortError, ValueError, FileNotFoundError, MlflowException, ComputeError) as error:
        click.echo(f"error: {error}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
