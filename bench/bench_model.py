"""Benchmark the model against the simulator's truth: every scenario, independent test draws.

For each scenario and seed: simulate a training cohort (seed) and an independent test cohort
of the same scenario (seed + 1000); fit the product's model search (what `itp-train train`
registers) on the training cohort, and an oracle (a correctly specified logistic model on the
true terms computed from the observed data: same missing values, microbiome terms from the
read counts) on the same training cohort; score both on the test cohort. Reports the AUROC
gap to the oracle, the share of the oracle's microbiome gain (combined minus clinical-only)
that the model captures, and the calibration slope on the test draw; and, as an ablation in
the same run, the gap of each member of the stacked model alone (the chosen linear model, the
random forest). The null scenario is scored by nested CV (it has no truth to approach).

    .venv/bin/python bench/bench_model.py                          # all scenarios, seeds 7,8,9
    .venv/bin/python bench/bench_model.py --scenarios default,null --seeds 7 --preset thorough
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from environment import environment
from sklearn.metrics import roc_auc_score

PACKAGES = ("scikit-learn", "xgboost-cpu", "numpy", "pandas")
GAIN_MIN = 0.01  # below this oracle gain, "share captured" is not meaningful


def load(cohort: object, directory: Path) -> tuple[pd.DataFrame, np.ndarray, np.ndarray,
                                                     pd.DataFrame, pd.DataFrame]:
    """The product's own reading path (files -> cohort -> labels -> model input)."""
    from training.cohort import load_cohort
    from training.features import model_input
    from training.outcomes import response_labels, target
    from training.simulate import write_cohort

    write_cohort(cohort, directory)
    loaded = load_cohort(directory)
    y = target(response_labels(loaded.metadata)).to_numpy()
    return (model_input(loaded.metadata, loaded.counts), y, loaded.groups.to_numpy(),
            cohort.metadata, cohort.feature_table)


def run(scenario_name: str, seed: int, patients: int, preset: str, workdir: Path,
        ranks: tuple[str, ...] | None = None) -> dict[str, object]:
    from training.evaluation import CVConfig, calibration, nested_cross_validate
    from training.model import DEFAULT_FAMILIES
    from training.simulate import SCENARIOS, oracle_design, oracle_model, simulate
    from training.train import PRESET_SETTINGS
    from training.tuning import ModelSearch, margin

    scenario = SCENARIOS[scenario_name]
    search = ModelSearch(families=DEFAULT_FAMILIES[preset], preset=preset, seed=seed,
                         inner_splits=PRESET_SETTINGS[preset]["inner_splits"], ranks=ranks)
    X, y, groups, meta, table = load(simulate(patients, seed, scenario),
                                     workdir / f"{scenario_name}-{seed}-train")
    started = time.perf_counter()
    if scenario_name == "null":
        result = nested_cross_validate(search, X, y, groups, CVConfig(n_bootstrap=200, seed=seed),
                                       regions=False)
        summary = result.champion.summary
        return {"scenario": scenario_name, "seed": seed, "nested_auroc": summary["auroc_mean"],
                "ci": f"{summary['auroc_ci_low']:.3f}-{summary['auroc_ci_high']:.3f}",
                "seconds": time.perf_counter() - started}
    Xt, yt, _, meta_t, table_t = load(simulate(patients, seed + 1000, scenario),
                                      workdir / f"{scenario_name}-{seed}-test")
    fitted = search.fit(X, y, groups)
    p = fitted.predict_proba(Xt)[:, 1]
    clinical = fitted.refit_best(X, y, features="clinical")
    p_clinical = clinical.predict_proba(Xt)[:, 1]
    oracle = {}
    for microbiome in (True, False):
        train_terms = oracle_design(meta, table, scenario, microbiome)
        test_terms = oracle_design(meta_t, table_t, scenario, microbiome).reindex(
            columns=train_terms.columns, fill_value=0.0)
        model = oracle_model().fit(train_terms, y)
        oracle[microbiome] = roc_auc_score(yt, model.predict_proba(test_terms)[:, 1])
    auroc, auroc_clinical = roc_auc_score(yt, p), roc_auc_score(yt, p_clinical)
    oracle_gain = oracle[True] - oracle[False]
    model = fitted.model_
    forest = model.companion_  # None when the stack gave it no weight
    return {
        "gap_linear": oracle[True] - roc_auc_score(yt, margin(model.pipeline_, Xt)),
        "gap_forest": (np.nan if forest is None
                       else oracle[True] - roc_auc_score(yt, margin(forest, Xt))),
        "forest_weight": model.companion_slope_,
        "scenario": scenario_name, "seed": seed, "auroc": auroc, "oracle": oracle[True],
        "gap": oracle[True] - auroc, "gain": auroc - auroc_clinical, "oracle_gain": oracle_gain,
        "captured": (auroc - auroc_clinical) / oracle_gain if oracle_gain >= GAIN_MIN else None,
        "slope": calibration(yt, p)["calibration_slope"],
        "chosen": f"{fitted.best_['family']}/{fitted.best_['feature_set']}",
        "seconds": time.perf_counter() - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenarios", default=None, help="comma-separated (default: all)")
    parser.add_argument("--seeds", default="7,8,9")
    parser.add_argument("--patients", type=int, default=400)
    parser.add_argument("--preset", default="fast")
    parser.add_argument("--ranks", default=None,
                        help="comma-separated taxonomic ranks to search (default: the preset's)")
    args = parser.parse_args()
    ranks = tuple(args.ranks.split(",")) if args.ranks else None

    from training.simulate import SCENARIOS

    names = args.scenarios.split(",") if args.scenarios else list(SCENARIOS)
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="itp-bench-model-") as tmp:
        for name in names:
            for seed in seeds:
                rows.append(run(name, seed, args.patients, args.preset, Path(tmp), ranks))
                print(rows[-1], file=sys.stderr, flush=True)
    frame = pd.DataFrame(rows)
    print(f"\nModel benchmark: preset {args.preset}, {args.patients} patients per draw, "
          f"seeds {args.seeds}" + (f", ranks {args.ranks}" if ranks else "") + "\n")
    print(f"Environment: {environment(PACKAGES)}\n")
    scored = frame[frame["scenario"] != "null"]
    if not scored.empty:
        print("| scenario | AUROC (test draw) | oracle AUROC | gap (floor <= 0.05, stretch "
              "<= 0.03) | microbiome gain / oracle gain | captured (floor >= 50%, stretch "
              ">= 70%) | calibration slope (floor 0.8-1.25, stretch 0.9-1.1) | chosen |")
        print("|---|---|---|---|---|---|---|---|")
        for name, group in scored.groupby("scenario", sort=False):
            captured = group["captured"].dropna()
            share = (f"{100 * group['gain'].sum() / group['oracle_gain'].sum():.0f}% "
                     f"(per seed {', '.join(f'{100 * c:.0f}%' for c in captured)})"
                     if not captured.empty else "n/a (no oracle gain)")
            print(f"| {name} | {group['auroc'].mean():.3f} | {group['oracle'].mean():.3f} | "
                  f"{group['gap'].mean():+.3f} (max {group['gap'].max():+.3f}) | "
                  f"{group['gain'].mean():+.3f} / {group['oracle_gain'].mean():+.3f} | "
                  f"{share} | {group['slope'].mean():.2f} ({group['slope'].min():.2f}-"
                  f"{group['slope'].max():.2f}) | {', '.join(group['chosen'])} |")
    if not scored.empty:
        print("\nAblation, the stack's members alone: mean gap to the oracle (max over seeds; "
              "the forest over the seeds that kept it)\n")
        print("| scenario | stacked (served) | linear member alone | forest member alone | "
              "forest weight (per seed) |")
        print("|---|---|---|---|---|")
        columns = ("gap", "gap_linear", "gap_forest")
        for name, group in scored.groupby("scenario", sort=False):
            print(f"| {name} | " + " | ".join(
                f"{group[c].mean():+.3f} ({group[c].max():+.3f})" for c in columns) + " | "
                + ", ".join(f"{w:.2f}" for w in group["forest_weight"]) + " |")
        print("| all | " + " | ".join(f"{scored[c].mean():+.3f}" for c in columns) + " | |")
    null = frame[frame["scenario"] == "null"]
    if not null.empty:
        print("\n| null scenario, seed | nested CV AUROC (target 0.50 +- 0.05) | 95% CI |")
        print("|---|---|---|")
        for _, row in null.iterrows():
            print(f"| {row['seed']} | {row['nested_auroc']:.3f} | {row['ci']} |")
    print(f"\nTotal {frame['seconds'].sum():.0f} s of fitting.")


if __name__ == "__main__":
    main()
