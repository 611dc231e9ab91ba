"""Real metagenomes: our default model against RF-500 and SIAMCAT-style L1, same outer folds.

The six MetAML disease tasks (Pasolli et al. 2016, ../shared/data/metaml, never copied into
the repository). Every method is scored on the same repeated, subject-grouped outer folds:

- ours: `ModelSearch` at its defaults (preset fast, genus or species chosen in inner CV;
  `--ranks` overrides),
  nested inside the folds;
- RF-500: MetAML's random forest (500 trees, sqrt features) on species relative abundances;
- SIAMCAT-style L1: log10(abundance + 1e-5), standardised, L1 logistic regression with C
  tuned by grouped inner CV, on species.

As an ablation in the same run, each member of our stacked model is also scored alone: the
chosen linear model and the random forest stacked with it (AUROC of their own log-odds).

    .venv/bin/python bench/bench_real.py [--repeats 2] [--tasks cirrhosis,t2d]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
from environment import environment
from scipy.special import expit
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedGroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer, StandardScaler

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "metaml" / "abundance.txt.bz2"
PACKAGES = ("scikit-learn", "xgboost-cpu", "numpy", "pandas")
TASKS: dict[str, tuple[Callable[[pd.DataFrame], pd.Series], Callable[[pd.DataFrame],
                                                                      pd.Series]]] = {
    # (select, label), filters from MetAML's dataset_selection_abundance.txt (SOURCE.md)
    "cirrhosis": (lambda m: m["dataset_name"] == "Quin_gut_liver_cirrhosis",
                  lambda m: m["disease"] == "cirrhosis"),
    "colorectal": (lambda m: (m["dataset_name"] == "Zeller_fecal_colorectal_cancer")
                   & m["group"].isin(["control", "crc"]),
                   lambda m: m["disease"] == "cancer"),
    "ibd": (lambda m: m["dataset_name"] == "metahit",
            lambda m: m["disease"].str.startswith("ibd_")),
    "obesity": (lambda m: (m["dataset_name"] == "Chatelier_gut_obesity") & (m["disease"] != "n"),
                lambda m: m["disease"] == "obesity"),
    "t2d": (lambda m: m["dataset_name"].isin(["t2dmeta_long", "t2dmeta_short"])
            & ~m["gender"].isin(["-", " -"]),
            lambda m: m["disease"] == "t2d"),
    "wt2d": (lambda m: (m["dataset_name"] == "WT2D")
             & (m["disease"] != "impaired_glucose_tolerance"),
             lambda m: m["disease"] == "t2d"),
}


def read() -> tuple[pd.DataFrame, pd.DataFrame]:
    raw = pd.read_csv(DATA, sep="\t", header=None, index_col=0, dtype=str)
    taxa = raw.index.str.startswith("k__")
    species = raw.index.str.contains("|s__", regex=False) & ~raw.index.str.contains(
        "|t__", regex=False)
    return raw.loc[~taxa].T, raw.loc[species].T.astype(float)


def baselines(seed: int) -> dict[str, object]:
    inner = StratifiedGroupKFold(5, shuffle=True, random_state=seed)
    siamcat = GridSearchCV(
        make_pipeline(FunctionTransformer(lambda x: np.log10(x / 100 + 1e-5)), StandardScaler(),
                      LogisticRegression(l1_ratio=1.0, solver="liblinear", max_iter=5000,
                                         random_state=seed)),
        {"logisticregression__C": list(np.geomspace(0.01, 10, 9))}, scoring="roc_auc", cv=inner)
    return {"RF-500": RandomForestClassifier(500, max_features="sqrt", n_jobs=2,
                                             random_state=seed),
            "SIAMCAT-L1": siamcat}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--ranks", default=None,
                        help="comma-separated taxonomic ranks ours searches (default: the "
                             "fast preset's)")
    args = parser.parse_args()
    ranks = tuple(args.ranks.split(",")) if args.ranks else None
    if not DATA.is_file():
        sys.exit(f"MetAML data not found at {DATA} (see ../shared/data/metaml/SOURCE.md)")

    from training.evaluation import CVConfig, grouped_splits, summarise
    from training.features import model_input
    from training.tuning import ModelSearch, margin

    metadata, abundances = read()
    config = CVConfig(n_splits=5, n_repeats=args.repeats, n_bootstrap=500, seed=args.seed)
    rows = []
    for task in args.tasks.split(","):
        select, label = TASKS[task]
        chosen = metadata.loc[select(metadata)]
        profiles = abundances.loc[chosen.index]
        profiles = profiles.loc[:, profiles.sum() > 0]
        y = label(chosen).astype(int).to_numpy()
        groups = chosen["subjectID"].to_numpy()
        X = model_input(pd.DataFrame({"treatment": "corticosteroid"}, index=chosen.index),
                        profiles)
        methods = ["ours", "RF-500", "SIAMCAT-L1", "linear member", "forest member"]
        oof = {name: np.full((args.repeats, len(y)), np.nan) for name in methods}
        weights = []
        started = time.perf_counter()
        for repeat, train, test in grouped_splits(y, groups, config):
            ours = ModelSearch(seed=args.seed, ranks=ranks).fit(X.iloc[train], y[train],
                                                                groups[train])
            oof["ours"][repeat, test] = ours.predict_proba(X.iloc[test])[:, 1]
            # members alone: their own log-odds rank the test fold (read the AUROC only)
            oof["linear member"][repeat, test] = expit(margin(ours.model_.pipeline_,
                                                              X.iloc[test]))
            forest = ours.model_.companion_
            if forest is not None:
                oof["forest member"][repeat, test] = expit(margin(forest, X.iloc[test]))
            weights.append(ours.model_.companion_slope_)
            for name, model in baselines(args.seed).items():
                fit_args = {"groups": groups[train]} if name == "SIAMCAT-L1" else {}
                model.fit(profiles.iloc[train], y[train], **fit_args)
                oof[name][repeat, test] = model.predict_proba(profiles.iloc[test])[:, 1]
        row = {"task": task, "n": len(y), "positives": int(y.sum()),
               "seconds": time.perf_counter() - started, "forest_weights": weights}
        for name, values in oof.items():
            if np.isnan(values).any():  # the forest was dropped in some fold
                row[name] = (np.nan, np.nan, np.nan)
                continue
            s = summarise(y, groups, values, config)
            row[name] = (s["auroc_mean"], s["auroc_ci_low"], s["auroc_ci_high"])
        rows.append(row)
        print(row, file=sys.stderr, flush=True)

    print(f"\nReal-data benchmark: MetAML tasks, {config.n_splits}x{args.repeats} grouped outer "
          "folds shared by all methods, AUROC (95% patient-bootstrap CI)"
          + (f"; ours searches ranks {args.ranks}" if ranks else "") + "\n")
    print(f"Environment: {environment(PACKAGES)}\n")
    print("| task | n (pos) | ours (nested, default search) | RF-500 (species) "
          "| SIAMCAT-L1 (species) "
          "| ours - better baseline |")
    print("|---|---|---|---|---|---|")
    margins = []
    for row in rows:
        best = max(row["RF-500"][0], row["SIAMCAT-L1"][0])
        margins.append(row["ours"][0] - best)
        cells = " | ".join(f"{row[m][0]:.3f} ({row[m][1]:.3f}-{row[m][2]:.3f})"
                           for m in ("ours", "RF-500", "SIAMCAT-L1"))
        print(f"| {row['task']} | {row['n']} ({row['positives']}) | {cells} | "
              f"{margins[-1]:+.3f} |")
    print(f"\nMean margin over the better baseline: {np.mean(margins):+.3f} "
          f"(target: >= -0.01 on every task, > 0 on average).")
    print("\nAblation, the stack's members alone (AUROC of their own log-odds; the forest "
          "only where every fold kept it)\n")
    print("| task | ours (stacked) | linear member | forest member | forest weight (median, "
          "range over folds) |")
    print("|---|---|---|---|---|")
    for row in rows:
        cells = " | ".join(f"{row[m][0]:.3f}" for m in ("ours", "linear member",
                                                         "forest member"))
        w = np.asarray(row["forest_weights"])
        print(f"| {row['task']} | {cells} | {np.median(w):.2f} ({w.min():.2f}-{w.max():.2f}) |")


if __name__ == "__main__":
    main()
