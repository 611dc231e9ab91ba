"""The public data contract: column names, vocabularies, types and units.

One place defines every field a cohort may carry, so the cohort loader, the simulator,
the feature pipeline and the service's request models cannot drift apart.
docs/data-format.md is the prose version of this module.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from enum import StrEnum

SAMPLE_ID = "sample-id"
SUBJECT_ID = "subject-id"
TREATMENT = "treatment"

TREATMENTS: tuple[str, ...] = (
    "corticosteroid",
    "ivig",
    "tpo_ra",
    "rituximab",
    "fostamatinib",
    "splenectomy",
    "h_pylori_eradication",
)
SEXES: tuple[str, ...] = ("female", "male")
BLEEDING_SCALES: tuple[str, ...] = ("WHO", "ITP-BAT", "Buchanan")
RESPONSES: tuple[str, ...] = ("CR", "R", "NR")
YES, NO = "yes", "no"


class Kind(StrEnum):
    NUMBER = "number"
    BOOLEAN = "boolean"
    CATEGORY = "category"
    TEXT = "text"


@dataclass(frozen=True)
class Field:
    """One column of metadata.tsv (and, for model inputs, one key of the service's `clinical`)."""

    name: str
    kind: Kind
    description: str
    unit: str | None = None
    categories: tuple[str, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None
    example: float | str | bool | None = None
    label: str = ""  # how a clinician names it (explanations, plots); the name when empty


# How a clinician names each treatment, for explanations and plots.
TREATMENT_LABELS: dict[str, str] = {
    "corticosteroid": "corticosteroids",
    "ivig": "IVIG",
    "tpo_ra": "TPO receptor agonist",
    "rituximab": "rituximab",
    "fostamatinib": "fostamatinib",
    "splenectomy": "splenectomy",
    "h_pylori_eradication": "H. pylori eradication",
}

# Model inputs besides treatment and microbiome. Only baseline_platelets is required.
CLINICAL_FIELDS: tuple[Field, ...] = (
    Field("baseline_platelets", Kind.NUMBER, "Platelet count when the treatment starts.",
          "x10^9/L", minimum=0, maximum=2000, example=18, label="Baseline platelet count"),
    Field("age_years", Kind.NUMBER, "Age at the start of treatment.", "years",
          minimum=0, maximum=120, example=46, label="Age"),
    Field("sex", Kind.CATEGORY, "Sex recorded at birth.", categories=SEXES, example="female",
          label="Sex"),
    Field("months_since_diagnosis", Kind.NUMBER,
          "Time from ITP diagnosis to the start of treatment; sets the phase "
          "(newly diagnosed < 3, persistent 3-12, chronic > 12 months).", "months",
          minimum=0, maximum=1200, example=1.5, label="Time since diagnosis"),
    Field("bleeding_score", Kind.TEXT,
          "Bleeding at the start of treatment on the scale given by bleeding_scale: "
          "WHO grade 0-4, Buchanan grade 0-5, or an ITP-BAT string such as 'S2M1O0'.",
          example="1", label="Bleeding score"),
    Field("bleeding_scale", Kind.CATEGORY, "Scale of bleeding_score.",
          categories=BLEEDING_SCALES, example="WHO", label="Bleeding scale"),
    Field("prior_lines", Kind.NUMBER, "Number of earlier ITP treatment lines.", "count",
          minimum=0, maximum=30, example=0, label="Prior treatment lines"),
    Field("h_pylori", Kind.BOOLEAN, "Helicobacter pylori infection.", example=False,
          label="H. pylori infection"),
    Field("antibiotics_3m", Kind.BOOLEAN, "Antibiotics taken in the 3 months before sampling.",
          example=False, label="Antibiotics in the last 3 months"),
    Field("ipf_pct", Kind.NUMBER, "Immature platelet fraction.", "%", minimum=0, maximum=100,
          example=9.5, label="Immature platelet fraction (IPF)"),
    Field("tpo_pg_ml", Kind.NUMBER, "Endogenous thrombopoietin, plasma.", "pg/mL", minimum=0,
          maximum=5000, example=55, label="Thrombopoietin (TPO)"),
    Field("anti_gpib", Kind.BOOLEAN, "Anti-GPIb-IX platelet autoantibodies detected.",
          example=False, label="Anti-GPIb-IX antibodies"),
    Field("treg_pct", Kind.NUMBER, "Regulatory T cells (CD4+CD25+FOXP3+) among CD4+ T cells.",
          "%", minimum=0, maximum=100, example=5.2, label="Regulatory T cells"),
    Field("il10_pg_ml", Kind.NUMBER, "Interleukin-10, serum.", "pg/mL", minimum=0,
          maximum=10000, example=6.1, label="IL-10"),
    Field("tgfb1_ng_ml", Kind.NUMBER, "TGF-beta1, serum.", "ng/mL", minimum=0, maximum=1000,
          example=22.0, label="TGF-β1"),
    Field("ifng_pg_ml", Kind.NUMBER, "Interferon-gamma, serum.", "pg/mL", minimum=0,
          maximum=10000, example=9.0, label="IFN-γ"),
    Field("il17_pg_ml", Kind.NUMBER, "Interleukin-17A, serum.", "pg/mL", minimum=0,
          maximum=10000, example=12.0, label="IL-17A"),
    Field("baff_pg_ml", Kind.NUMBER, "B-cell activating factor, serum.", "pg/mL", minimum=0,
          maximum=100000, example=950.0, label="BAFF"),
)

# Outcome columns: the label is derived from these by outcomes.py (or given as `response`).
OUTCOME_FIELDS: tuple[Field, ...] = (
    Field("followup_platelets", Kind.NUMBER, "Platelet count at the response assessment.",
          "x10^9/L", minimum=0, maximum=2000, example=85),
    Field("followup_day", Kind.NUMBER, "Day of the response assessment after treatment start.",
          "days", minimum=0, maximum=3650, example=28),
    Field("followup_bleeding", Kind.BOOLEAN, "Bleeding at the response assessment.",
          example=False),
    Field("steroid_dependent", Kind.BOOLEAN,
          "Corticosteroids needed for >= 2 months to keep platelets >= 30 (scored as NR).",
          example=False),
    Field("response", Kind.CATEGORY, "Precomputed IWG response, used when follow-up columns "
          "are absent.", categories=RESPONSES, example="R"),
)

# Right-skewed, positive lab values and durations whose effects are reported per doubling;
# the linear model sees them as ln(1 + x) (training.structure.LogScale).
LOG_SCALE_FIELDS: tuple[str, ...] = (
    "baseline_platelets", "months_since_diagnosis", "ipf_pct", "tpo_pg_ml", "treg_pct",
    "il10_pg_ml", "tgfb1_ng_ml", "ifng_pg_ml", "il17_pg_ml", "baff_pg_ml",
)

REQUIRED_COLUMNS: tuple[str, ...] = (SAMPLE_ID, SUBJECT_ID, TREATMENT, "baseline_platelets")
FOLLOWUP_COLUMNS: tuple[str, ...] = ("followup_platelets", "followup_day", "followup_bleeding")

CLINICAL_BY_NAME: dict[str, Field] = {f.name: f for f in CLINICAL_FIELDS}
FIELDS_BY_NAME: dict[str, Field] = {f.name: f for f in CLINICAL_FIELDS + OUTCOME_FIELDS}

# Taxon ids are lineage strings whose parts carry rank prefixes: SILVA/GTDB (`d__Bacteria;
# p__Firmicutes;...`), SILVA 132 (`D_0__Bacteria;D_1__Firmicutes;...`) or MetaPhlAn
# (`k__Bacteria|p__Firmicutes|...`); training.taxonomy harmonises their spellings.
RANKS: tuple[str, ...] = ("domain", "phylum", "class", "order", "family", "genus", "species")
# Feature tables hold one rank, or several side by side (training.taxonomy.RANK_SETS).
FEATURE_RANKS: tuple[str, ...] = (*RANKS, "both")
RANK_PREFIXES: dict[str, str] = {
    "d": "domain", "k": "domain", "p": "phylum", "c": "class", "o": "order",
    "f": "family", "g": "genus", "s": "species", "t": "strain",
}
TAXON_PATTERN = re.compile(r"^\s*(?:[dkpcofgst]|D_\d)__")  # D_n__: SILVA 132 levels


def is_taxon(column: str) -> bool:
    """Whether a model-input column holds a taxon's reads (clinical names never start `x__`)."""
    return bool(TAXON_PATTERN.match(str(column)))


def parse_boolean(value: str) -> float:
    """yes/no (any case) -> 1.0/0.0; empty -> NaN. Raises ValueError on anything else."""
    text = value.strip().lower()
    if text == "":
        return math.nan
    if text == YES:
        return 1.0
    if text == NO:
        return 0.0
    raise ValueError(f"expected yes or no, got {value!r}")


_ITP_BAT = re.compile(r"^S([0-4])M([0-4])O([0-5])$", re.IGNORECASE)
_SCALE_MAX = {"WHO": 4, "Buchanan": 5}


def bleeding_severity(score: str | float | None, scale: str | None) -> float:
    """A bleeding score on any supported scale -> severity in [0, 1] (NaN when absent).

    Scores on different scales are not comparable as raw numbers, so the model sees the
    fraction of each scale's maximum; for ITP-BAT the worst domain grade counts, over 4
    (SMOG grades are "0 to 3 or 4, with grade 5 for any fatal bleeding", Rodeghiero et al.,
    Blood 2013;121:2596; a fatal grade is capped at 1).
    """
    if score is None or (isinstance(score, float) and math.isnan(score)):
        return math.nan
    text = str(score).strip()
    if text == "":
        return math.nan
    if scale is None or (isinstance(scale, float) and math.isnan(scale)) or scale == "":
        raise ValueError("bleeding_score given without bleeding_scale")
    if scale == "ITP-BAT":
        match = _ITP_BAT.match(text)
        if not match:
            raise ValueError(f"ITP-BAT score must look like 'S2M1O0', got {text!r}")
        return min(1.0, max(int(g) for g in match.groups()) / 4)
    if scale not in _SCALE_MAX:
        raise ValueError(f"unknown bleeding_scale {scale!r}; expected one of {BLEEDING_SCALES}")
    try:
        grade = float(text)
    except ValueError:
        raise ValueError(f"{scale} grade must be a number, got {text!r}") from None
    if not grade.is_integer() or not 0 <= grade <= _SCALE_MAX[scale]:
        raise ValueError(f"{scale} grade must be an integer 0-{_SCALE_MAX[scale]}, got {text!r}")
    return grade / _SCALE_MAX[scale]
