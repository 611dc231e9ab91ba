"""Figures logged with every run: discrimination, calibration, and what drives predictions."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # headless: training runs on servers and CI

import matplotlib.pyplot as plt
import numpy as np
import shap
from matplotlib.figure import Figure
from sklearn.calibration import calibration_curve
from sklearn.metrics import RocCurveDisplay

from training.evaluation import CVResult
from training.explain import Explanation


def roc_figure(result: CVResult, title: str) -> Figure:
    """Out-of-fold ROC curve of each CV repeat, with the mean AUROC and its CI."""
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for repeat, probabilities in enumerate(result.oof):
        RocCurveDisplay.from_predictions(
            result.y, probabilities, ax=ax, name=f"repeat {repeat + 1}",
            curve_kwargs={"alpha": 0.6, "lw": 1}, plot_chance_level=repeat == 0,
        )
    s = result.summary
    ax.set_title(
        f"{title}\nAUROC {s['auroc_mean']:.3f} (95% CI {s['auroc_ci_low']:.3f}-"
        f"{s['auroc_ci_high']:.3f}), out-of-fold",
        fontsize=10,
    )
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


def calibration_figure(result: CVResult, title: str, n_bins: int = 10) -> Figure:
    """Observed response rate against predicted probability, pooled over repeats."""
    fig, ax = plt.subplots(figsize=(5.5, 5))
    y = np.tile(result.y, len(result.oof))
    observed, predicted = calibration_curve(y, result.oof.ravel(), n_bins=n_bins,
                                            strategy="quantile")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", label="perfect calibration")
    ax.plot(predicted, observed, marker="o", label="out-of-fold (quantile bins)")
    s = result.summary
    ax.set(xlabel="predicted probability of response", ylabel="observed response rate",
           xlim=(0, 1), ylim=(0, 1))
    ax.set_title(
        f"{title}\ncalibration slope {s['calibration_slope_mean']:.2f}, intercept "
        f"{s['calibration_intercept_mean']:.2f}, Brier {s['brier_mean']:.3f}",
        fontsize=10,
    )
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    return fig


def shap_summary_figure(explanation: Explanation, max_display: int = 20) -> Figure:
    """Beeswarm of SHAP values over the training cohort (log-odds of response)."""
    shap.summary_plot(
        explanation.shap_values,
        features=explanation.values,
        feature_names=[_short(n) for n in explanation.feature_names],
        max_display=max_display,
        show=False,
        plot_size=(9, 0.35 * max_display + 1.5),
    )
    fig = plt.gcf()
    fig.axes[0].set_xlabel("SHAP value (contribution to log-odds of response)")
    fig.tight_layout()
    return fig


def _short(name: str) -> str:
    """A lineage is unreadable on an axis: keep its last two levels."""
    parts = name.split(";")
    return ";".join(parts[-2:]) if len(parts) > 2 else name
