"""Model card: what a reviewer or ethics board asks of a prediction model, in one document.

The sections follow TRIPOD+AI (Collins et al., BMJ 2024) for the model and STORMS (Mirzayi
et al., Nat Med 2021) for the microbiome data. Every number comes from the training run that
produced the model; nothing is typed in by hand. Written as Markdown (the MLflow registry
shows it as the version description) and HTML (an artifact a reviewer can open).
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Any

import markdown
import numpy as np
import pandas as pd

from training.cohort import Cohort
from training.evaluation import NestedResult, net_benefit
from training.outcomes import BASELINE_CEILINGS, DEFAULT_WINDOWS, Outcomes
from training.schema import CLINICAL_FIELDS, SUBJECT_ID, TREATMENT
from training.subgroups import subgroup_table
from training.taxonomy import levels

SUBGROUPS = "### Subgroups (out-of-fold predictions)"
LIMITATIONS = "## Limitations"
SUBGROUP_COLUMNS = {"variable": "by", "responders": "events", "observed_rate": "observed",
                    "mean_predicted": "predicted", "calibration_in_the_large": "CITL"}
SUMMARY_LIMIT = 4800  # MLflow's SQL store keeps at most 5,000 characters of a description


@dataclass(frozen=True)
class CardInputs:
    """Everything the card reports, straight from the training run."""

    name: str
    run_id: str
    trained_at: str
    definition: str
    target: str
    preset: str
    windows: dict[str, tuple[int, int]] | None
    cohort: Cohort
    outcomes: Outcomes
    metadata: pd.DataFrame  # the included episodes
    y: np.ndarray
    nested: NestedResult
    chosen: dict[str, Any]
    model: Any  # the fitted ResponseModel
    feature_schema: dict[str, Any]
    warnings: list[str]
    permuted_auroc: list[float]
    min_reads: int


def _ci(summary: dict[str, float], metric: str, digits: int = 3, signed: bool = False) -> str:
    form = f"{{:{'+' if signed else ''}.{digits}f}}"
    return (f"{form.format(summary[f'{metric}_mean'])} (95% CI "
            f"{form.format(summary[f'{metric}_ci_low'])} to "
            f"{form.format(summary[f'{metric}_ci_high'])})")


def _sequencing(cohort: Cohort) -> str:
    kinds = {"qiime2": "16S rRNA amplicon (QIIME 2 artifacts)",
             "metaphlan": "shotgun metagenomics (MetaPhlAn relative abundances)",
             "table": "feature table as provided"}
    return f"{kinds.get(cohort.profile_source, cohort.profile_source)}, {cohort.abundance}"


def _candidate_parameters(model: Any, schema: dict[str, Any]) -> int:
    """Columns the final estimator chose among (treatment x marker terms included)."""
    try:
        return len(model.pipeline_[:-1].get_feature_names_out())
    except (AttributeError, ValueError):
        return len(schema["features"])


def model_card(facts: CardInputs) -> str:
    """The full card as Markdown."""
    champion = facts.nested.champion
    s = champion.summary
    meta, y = facts.metadata, facts.y
    events = int(min(y.sum(), len(y) - y.sum()))
    parameters = _candidate_parameters(facts.model, facts.feature_schema)
    treatments = meta[TREATMENT].value_counts()
    windows = facts.windows if facts.windows is not None else DEFAULT_WINDOWS
    missing = pd.Series({f.name: float(meta[f.name].isna().mean()) for f in CLINICAL_FIELDS
                         if f.name in meta})
    missing = missing[missing > 0].sort_values(ascending=False)
    gain = facts.nested.comparisons.get("combined-vs-clinical", {})
    benefit = net_benefit(champion.y, champion.oof[0], np.array([facts.model.threshold_]))
    subgroups = subgroup_table(meta, champion.y, champion.oof[0])
    share = facts.cohort.unassigned_share
    taxa_used = facts.feature_schema.get("taxa_used", [])
    rank = levels(str(facts.feature_schema.get("rank", "genus")))
    lines = [
        f"# Model card: {facts.name}",
        "",
        "**Research use only.** Not a medical device; not validated for clinical decisions.",
        "",
        "## Intended use",
        f"Predicts the probability that an adult with primary immune thrombocytopenia "
        f"responds (`{facts.target}` under the `{facts.definition}` definition) to the "
        f"treatment episode that starts at the sample, from the gut-microbiome profile and "
        f"clinical and immune data taken before treatment. Treatments seen in training: "
        + ", ".join(f"{t} ({n} episodes)" for t, n in treatments.items()) + ".",
        "",
        "## Outcome",
        f"Label derived by the `{facts.definition}` criteria (docs/data-format.md); episodes "
        f"whose baseline count was already at or above {BASELINE_CEILINGS[facts.definition]} "
        f"x10^9/L, or whose assessment fell outside the response window, were excluded "
        f"({len(facts.outcomes.excluded)} episodes). Response windows (days after start): "
        + ", ".join(f"{t} {lo}-{hi}" for t, (lo, hi) in windows.items()) + ".",
        "",
        "## Data",
        f"- Source: `{facts.cohort.source}`, fingerprint `{facts.cohort.fingerprint[:16]}`, "
        f"read on {facts.trained_at[:10]}.",
        f"- {len(y)} episodes of {meta[SUBJECT_ID].nunique()} patients; {int(y.sum())} "
        f"responders ({100 * y.mean():.0f}%).",
        f"- Sample size: {events} events in the smaller outcome class for {parameters} "
        f"candidate parameters ({events / max(parameters, 1):.2f} events per candidate "
        "parameter; penalised estimation and nested CV, not EPP rules, guard against "
        "overfitting).",
        "",
        "### Microbiome data (STORMS)",
        f"- Sequencing and profile type: {_sequencing(facts.cohort)}.",
        f"- Taxonomic rank of the features: {' and '.join(rank)}"
        f"{' (each its own composition)' if len(rank) > 1 else ''}; taxa "
        f"harmonised across SILVA, GTDB, Greengenes2 and MetaPhlAn names "
        "(docs/data-format.md).",
        f"- Depth filtering: samples with fewer than {facts.min_reads} reads dropped "
        f"({len(facts.cohort.dropped)} samples)."
        + (f" Reads without a taxon: median {100 * share.median():.1f}% per sample, left "
           "out of the features." if share is not None and share.gt(0).any() else ""),
        f"- In-fold filtering: taxa kept by prevalence and abundance, then centred log-ratio "
        f"with a pseudocount; {len(taxa_used)} taxa used by the model.",
        "",
        "## Predictors and preprocessing",
        f"Model: {facts.chosen['family']} on the {facts.chosen['feature_set']} feature set, "
        f"chosen by inner cross-validation among feature sets, families and "
        f"hyperparameters (`{facts.preset}` preset): "
        + ", ".join(f"`{k}={v}`" for k, v in facts.chosen["params"].items()) + "."
        + (f" Stacked with a random forest on the same features (200 trees of depth 4): "
           f"served log-odds = {facts.model.intercept_:+.2f} + {facts.model.slope_:.2f} x "
           f"the {facts.chosen['family']} model's + {facts.model.companion_slope_:.2f} x the "
           "forest's, weights fitted on out-of-fold predictions."
           if facts.model.companion_ is not None else ""),
        "Clinical and immune predictors: " + ", ".join(
            f.name + (f" ({f.unit})" if f.unit else "") for f in CLINICAL_FIELDS) + ".",
        "",
        "### Missing data",
        ("Clinical values missing (share of episodes): " + ", ".join(
            f"{k} {100 * v:.0f}%" for k, v in missing.items())
         + ". Imputed by the training median inside each fold; missing-value indicators "
           "only when asked for." if len(missing) else "No clinical values missing."),
        "",
        "## Performance (nested cross-validation, selection included)",
        f"- AUROC {_ci(s, 'auroc')}; AUPRC {_ci(s, 'auprc')}; Brier {_ci(s, 'brier')}.",
        f"- Calibration slope {_ci(s, 'calibration_slope', 2)}; calibration-in-the-large "
        f"{_ci(s, 'calibration_in_the_large', 2, signed=True)}.",
        f"- Permuted-label control: AUROC {np.mean(facts.permuted_auroc):.3f} over "
        f"{len(facts.permuted_auroc)} permutations (expected 0.5)."
        if facts.permuted_auroc else "- Permuted-label control: not run.",
        "",
        "### Microbiome added value",
        (f"Combined minus clinical-only AUROC on the same outer folds: "
         f"{gain['auroc_difference']:+.3f} (95% CI {gain['ci_low']:+.3f} to "
         f"{gain['ci_high']:+.3f})." if gain else "Not assessed."),
        "",
        "### Clinical utility",
        f"Decision threshold {facts.model.threshold_:.3f} (chosen inside CV). Net benefit "
        f"there: model {benefit['model'][0]:.3f}, treat all {benefit['treat_all'][0]:.3f}, "
        "treat none 0.",
        "",
        SUBGROUPS,
        subgroups.rename(columns=SUBGROUP_COLUMNS).to_markdown(index=False, floatfmt=".2f"),
        "",
        LIMITATIONS,
        "- Internal validation only: performance on another site, sequencing protocol or "
        "population must be checked with `itp-train evaluate` before any use there.",
        "- Microbiome features are compositional (centred log-ratios): a taxon's value is "
        "relative to the others, not an absolute abundance, and its attribution is an "
        "association, not a cause.",
        "- Taxa the model never saw are ignored at prediction and reported with their share "
        "of reads.",
        *(f"- {w}" for w in facts.warnings),
        "",
        f"Training run: `{facts.run_id}`.",
    ]
    return "\n".join(lines) + "\n"


def card_summary(card: str, link: str) -> str:
    """The card cut to fit a registry description, pointing to the whole one."""
    tail = f"\n\n(Full model card: {link})"
    if len(card) + len(tail) > SUMMARY_LIMIT and SUBGROUPS in card:
        start, end = card.index(SUBGROUPS), card.index(LIMITATIONS)
        card = card[:start] + SUBGROUPS + "\nIn the full model card.\n\n" + card[end:]
    if len(card) + len(tail) <= SUMMARY_LIMIT:
        return card + tail
    return card[:SUMMARY_LIMIT - len(tail) - 4].rsplit("\n", 1)[0] + "\n..." + tail


def card_html(card: str, title: str) -> str:
    """The card as a standalone page. Raw HTML is shown as text, never rendered: the card
    writes none of its own, and file or experiment names come from users."""
    renderer = markdown.Markdown(extensions=["tables"])
    renderer.preprocessors.deregister("html_block")  # raw HTML stays text
    renderer.inlinePatterns.deregister("html")
    body = renderer.convert(card)
    return (f"<!doctype html>\n<html><head><meta charset='utf-8'>"
            f"<title>{html.escape(title)}</title>"
            "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}"
            "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px}"
            f"</style></head>\n<body>\n{body}\n</body></html>\n")
