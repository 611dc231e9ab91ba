"""Figures logged with every run: discrimination, calibration, clinical utility, comparison of
models, and what drives predictions (and how stable that is). docs/evaluation.md explains how
to read each one."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # headless: training runs on servers and CI

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import shap
from matplotlib.figure import Figure
from scipy.stats import binomtest
from sklearn.metrics import precision_recall_curve, roc_curve

from training.evaluation import CVResult, NestedResult, net_benefit, patient_resamples
from training.explain import Explanation, display_name, feature_unit

GRID = np.linspace(0, 1, 101)


def _title(ax: plt.Axes, title: str, detail: str) -> None:
    ax.set_title(f"{title}\n{detail}", fontsize=10)


def roc_figure(result: CVResult, title: str) -> Figure:
    """Pooled out-of-fold ROC curve per repeat, with a band over the outer folds (mean +- 1 SD
    of their own curves, each fold's model on its own test patients) or, for one scored set
    (external validation), over patient-bootstrap resamples."""
    fig, ax = plt.subplots(figsize=(5.5, 5))
    y = result.y
    for repeat, probabilities in enumerate(result.oof):
        fpr, tpr, _ = roc_curve(y, probabilities)
        ax.plot(fpr, tpr, lw=1.4, alpha=0.9, label=f"pooled, repeat {repeat + 1}")
    curves = _fold_curves(result) if result.folds is not None else []
    if len(curves) >= 2:
        for i, curve in enumerate(curves):
            ax.plot(GRID, curve, lw=0.6, color="grey", alpha=0.35,
                    label="outer folds" if i == 0 else None)
        mean, sd = np.mean(curves, axis=0), np.std(curves, axis=0)
        ax.fill_between(GRID, np.clip(mean - sd, 0, 1), np.clip(mean + sd, 0, 1), alpha=0.2,
                        label=f"fold mean +- 1 SD ({len(curves)} folds)")
    else:
        tprs = []
        for _, index in patient_resamples(y, result.groups, 200, seed=0):
            fpr, tpr, _ = roc_curve(y[index], result.oof[0][index])
            tprs.append(np.interp(GRID, fpr, tpr))
        low, high = np.percentile(tprs, [2.5, 97.5], axis=0)
        ax.fill_between(GRID, low, high, alpha=0.2, label="95% band (bootstrap)")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", label="chance")
    s = result.summary
    ax.set(xlabel="1 - specificity", ylabel="sensitivity")
    _title(ax, title, f"AUROC {s['auroc_mean']:.3f} (95% CI {s['auroc_ci_low']:.3f}-"
           f"{s['auroc_ci_high']:.3f}), out-of-fold")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


def _fold_curves(result: CVResult) -> list[np.ndarray]:
    """Each outer fold's ROC curve on the common grid (folds with both outcomes only)."""
    curves = []
    for repeat, folds in enumerate(result.folds):
        for fold in np.unique(folds[folds >= 0]):
            inside = folds == fold
            if len(np.unique(result.y[inside])) == 2:
                fpr, tpr, _ = roc_curve(result.y[inside], result.oof[repeat, inside])
                curve = np.interp(GRID, fpr, tpr)
                curve[0] = 0.0
                curves.append(curve)
    return curves


def pr_figure(result: CVResult, title: str) -> Figure:
    """Precision-recall of response, with the response rate as the no-skill line."""
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for repeat, probabilities in enumerate(result.oof):
        precision, recall, _ = precision_recall_curve(result.y, probabilities)
        ax.plot(recall, precision, lw=1.2, label=f"repeat {repeat + 1}")
    ax.axhline(result.y.mean(), ls="--", color="grey", label="no skill (response rate)")
    s = result.summary
    ax.set(xlabel="recall (sensitivity)", ylabel="precision (PPV)", ylim=(0, 1.02))
    _title(ax, title, f"AUPRC {s['auprc_mean']:.3f} (95% CI {s['auprc_ci_low']:.3f}-"
           f"{s['auprc_ci_high']:.3f})")
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    return fig


def calibration_figure(result: CVResult, title: str, n_bins: int = 10) -> Figure:
    """Reliability diagram: observed response rate per decile of predicted probability, with
    exact binomial 95% CIs per bin, pooled over repeats."""
    fig, ax = plt.subplots(figsize=(5.5, 5))
    y = np.tile(result.y, len(result.oof))
    p = result.oof.ravel()
    bins = pd.qcut(p, n_bins, labels=False, duplicates="drop")
    frame = pd.DataFrame({"y": y, "p": p, "bin": bins}).groupby("bin")
    predicted, observed = frame["p"].mean(), frame["y"].mean()
    intervals = [binomtest(int(g["y"].sum()), len(g)).proportion_ci() for _, g in frame]
    low = observed - [i.low for i in intervals]
    high = np.array([i.high for i in intervals]) - observed
    ax.plot([0, 1], [0, 1], ls="--", color="grey", label="perfect calibration")
    ax.errorbar(predicted, observed, yerr=[low, high], marker="o", capsize=3,
                label="out-of-fold, deciles (95% CI)")
    s = result.summary
    detail = (f"slope {s['calibration_slope_mean']:.2f}, in-the-large "
              f"{s['calibration_in_the_large_mean']:+.2f}")
    if "calibration_slope_ci_low" in s:
        detail = (f"slope {s['calibration_slope_mean']:.2f} ({s['calibration_slope_ci_low']:.2f}-"
                  f"{s['calibration_slope_ci_high']:.2f}), in-the-large "
                  f"{s['calibration_in_the_large_mean']:+.2f} "
                  f"({s['calibration_in_the_large_ci_low']:+.2f} to "
                  f"{s['calibration_in_the_large_ci_high']:+.2f})")
    ax.set(xlabel="predicted probability of response", ylabel="observed response rate",
           xlim=(0, 1), ylim=(0, 1))
    _title(ax, title, detail)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    return fig


def decision_curve_figure(result: CVResult, title: str) -> Figure:
    """Net benefit of acting on the model's probability vs treat-all and treat-none."""
    fig, ax = plt.subplots(figsize=(5.5, 5))
    thresholds = np.linspace(0.05, 0.95, 91)
    curves = [net_benefit(result.y, p, thresholds) for p in result.oof]
    model = np.mean([c["model"] for c in curves], axis=0)
    ax.plot(thresholds, model, label="model (out-of-fold)")
    ax.plot(thresholds, curves[0]["treat_all"], ls="--", label="treat all as responders")
    ax.plot(thresholds, curves[0]["treat_none"], ls=":", color="black", label="treat none")
    ax.set(xlabel="threshold probability of response", ylabel="net benefit",
           ylim=(min(-0.05, float(model.min())), max(0.05, float(result.y.mean()) + 0.05)))
    _title(ax, title, "decision curve (Vickers 2006)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def comparison_figure(nested: NestedResult) -> Figure:
    """AUROC with 95% CI of every scored model on the same outer folds."""
    names = list(nested.results)
    s = [nested.results[n].summary for n in names]
    fig, ax = plt.subplots(figsize=(6.5, 0.45 * len(names) + 1.5))
    mean = np.array([x["auroc_mean"] for x in s])
    err = [mean - [x["auroc_ci_low"] for x in s], [x["auroc_ci_high"] for x in s] - mean]
    ax.errorbar(mean, range(len(names)), xerr=err, fmt="o", capsize=3)
    ax.set_yticks(range(len(names)), names)
    ax.axvline(0.5, ls="--", color="grey")
    ax.set_xlabel("AUROC (nested CV, 95% CI)")
    ax.invert_yaxis()
    fig.tight_layout()
    return fig


def shap_summary_figure(explanation: Explanation, max_display: int = 20) -> Figure:
    """Beeswarm of SHAP values over the training cohort (log-odds of response)."""
    shap.summary_plot(
        explanation.shap_values,
        features=explanation.values,
        feature_names=[_with_unit(str(n)) for n in explanation.feature_names],
        max_display=max_display,
        show=False,
        plot_size=(9, 0.35 * max_display + 1.5),
    )
    fig = plt.gcf()
    fig.axes[0].set_xlabel("SHAP value (contribution to recalibrated log-odds of response)")
    fig.tight_layout()
    return fig


def _with_unit(feature: str) -> str:
    """"Thrombopoietin (TPO), pg/mL": the beeswarm colours points by the feature's value."""
    unit = feature_unit(feature)
    return f"{display_name(feature)}, {unit}" if unit else display_name(feature)


def shap_stability_figure(importances: list[pd.Series], stability: dict[str, float],
                          top: int = 15) -> Figure:
    """Mean |SHAP| of the top features in each outer fold: long bars with small spread are
    explanations that hold up; features that appear in one fold only do not."""
    frame = pd.concat(importances, axis=1).fillna(0.0) if importances else pd.DataFrame()
    fig, ax = plt.subplots(figsize=(8, 0.35 * top + 1.5))
    if not frame.empty:
        order = frame.mean(axis=1).nlargest(top).index
        ax.boxplot(frame.loc[order].T.to_numpy(), vert=False, widths=0.6)
        ax.set_yticks(range(1, len(order) + 1), [display_name(str(n)) for n in order])
        ax.invert_yaxis()
    detail = ", ".join(f"{k} {v:.2f}" for k, v in stability.items())
    ax.set_xlabel("mean |SHAP| on the outer test fold (one point per fold)")
    ax.set_title(f"SHAP stability across outer folds\n{detail}", fontsize=10)
    fig.tight_layout()
    return fig
