"""Simulated ITP cohorts whose true response mechanism is known.

Real cohorts are small and nobody knows their true response model, so the pipeline's AUROC,
calibration and explanations can only be checked against a cohort whose truth is written
down next to it. The generative model, its parameters and their sources are in
docs/simulator.md; this module is its executable form.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import optimize, special, stats

from training import schema

OUTCOME_COLUMNS: tuple[str, ...] = tuple(
    f.name for f in schema.OUTCOME_FIELDS if f.name != "response"
)
BATCH = "batch"
IMMUNE_MARKERS: tuple[str, ...] = (
    "treg_pct", "il10_pg_ml", "tgfb1_ng_ml", "ifng_pg_ml", "il17_pg_ml", "baff_pg_ml",
)
ENTEROTYPES: tuple[str, ...] = ("bacteroides", "prevotella", "firmicutes", "dysbiotic")
ROLES: tuple[str, ...] = ("scfa", "inflammatory", "other")
MAX_SPECIES = 3
FILES: tuple[str, ...] = ("metadata.tsv", "feature-table.tsv", "truth.json", "truth.tsv")

# Decimals written per numeric column. The truth is computed from the rounded values, so it is
# a function of exactly what a model can read.
DECIMALS: dict[str, int] = {
    "baseline_platelets": 0, "age_years": 0, "months_since_diagnosis": 1, "prior_lines": 0,
    "ipf_pct": 1, "tpo_pg_ml": 0, "treg_pct": 2, "il10_pg_ml": 2, "tgfb1_ng_ml": 1,
    "ifng_pg_ml": 2, "il17_pg_ml": 2, "baff_pg_ml": 0, "followup_platelets": 0,
    "followup_day": 0,
}

# Added to group sums before logs: about one read in 10^4, so absent groups stay finite.
PSEUDO_ABUNDANCE = 1e-4

# Inputs of the true logit (x in beta * x); every one is computed from observed values only.
FEATURES: dict[str, str] = {
    "age_per_10y": "(age_years - 50) / 10",
    "bleeding_severity": "schema.bleeding_severity(bleeding_score, bleeding_scale), 0-1",
    "log2_ipf": "log2(ipf_pct / 9)",
    "anti_gpib": "1 if anti_gpib == yes else 0",
    "tpo_per_10": "(tpo_pg_ml - 50) / 10",
    "log2_months": "log2(1 + months_since_diagnosis)",
    **{
        f"std_log_{m}": f"(ln {m} - ln median) / sd, median and sd of the scenario's marker model"
        for m in IMMUNE_MARKERS
    },
    "scfa_balance": "ln(sum of SCFA-producer genera) - ln(sum of inflammatory genera), "
                    "true genus composition before read sampling",
    "signature": "ln(sum of the scenario's signature genera), true genus composition",
}
TAXON_FEATURE = "taxon:"  # taxon:<Genus> = log10(relative abundance of that genus + 1e-4)


def feature_definition(feature: str) -> str:
    """What a term of the true logit is computed from (FEATURES, or one genus's abundance)."""
    if feature.startswith(TAXON_FEATURE):
        return (f"log10(relative abundance of genus {feature.removeprefix(TAXON_FEATURE)} "
                "+ 1e-4), true genus composition")
    return FEATURES[feature]


@dataclass(frozen=True)
class Mediator:
    """A genus whose abundance shifts an immune marker: ln marker += loading x the genus's
    standardised log10 abundance. Its effect on response then runs through the marker."""

    genus: str
    marker: str
    loading: float


@dataclass(frozen=True)
class Effect:
    """One term beta * feature of the true logit, for the listed treatments (empty = all)."""

    feature: str
    beta: float
    treatments: tuple[str, ...] = ()
    source: str = "assumption"

    @property
    def name(self) -> str:
        return f"{self.feature}:{'+'.join(self.treatments) or 'all'}"


@dataclass(frozen=True)
class Marker:
    """Log-normal immune marker: ln x = ln median + z_loading * z + noise_sd * N(0, 1)."""

    median: float
    z_loading: float
    noise_sd: float

    @property
    def log_sd(self) -> float:
        return math.hypot(self.z_loading, self.noise_sd)


DEFAULT_EFFECTS: tuple[Effect, ...] = (
    Effect("age_per_10y", -0.35, ("corticosteroid",), "domain 3: older age down [V]"),
    Effect("bleeding_severity", -1.5, ("corticosteroid",),
           "domain 3: bleeding score >= 8 down [V]"),
    Effect("log2_ipf", 0.9, ("corticosteroid",), "domain 3: IPF 16% vs 6.6% [V]"),
    Effect("anti_gpib", -0.4, ("corticosteroid",),
           "domain 3: anti-GPIb-alpha down for steroids [V], mapped to anti_gpib"),
    Effect("anti_gpib", -1.96, ("ivig",), "domain 3: 36% vs 80% [V] = logit difference"),
    Effect("tpo_per_10", -0.25, ("tpo_ra",),
           "domain 3: OR 0.52 per +10 pg/mL [V], attenuated to OR 0.78"),
    Effect("log2_months", -0.25, ("tpo_ra",), "domain 3: shorter duration up [V, small study]"),
    Effect("std_log_treg_pct", 0.25, (), "domain 3: Treg low in active ITP [V]"),
    Effect("std_log_tgfb1_ng_ml", 0.20, (), "domain 3: TGF-beta1 rises with remission [V]"),
    Effect("std_log_il10_pg_ml", 0.10, (), "domain 4: SCFA -> Treg/IL-10 mechanism"),
    Effect("std_log_ifng_pg_ml", -0.20, (), "domain 3: IFN-gamma high in active ITP [V]"),
    Effect("std_log_baff_pg_ml", -0.20, (), "domain 3: BAFF high in active ITP [V]"),
    Effect("std_log_il17_pg_ml", -0.10, (), "domain 4: LPS/barrier -> Th17 mechanism"),
    Effect("scfa_balance", 0.30, (), "domain 4: SCFA producers -> Treg/IL-10/TGF-beta"),
    Effect("signature", 0.15, ("corticosteroid",),
           "domain 4: Liu 2025 Bacteroides/Parabacteroides species; direction assumed"),
)

DEFAULT_RATES: dict[str, float] = {
    "corticosteroid": 0.70, "ivig": 0.75, "tpo_ra": 0.75, "rituximab": 0.60,
    "fostamatinib": 0.43, "splenectomy": 0.80, "h_pylori_eradication": 0.50,
}

DEFAULT_MARKERS: dict[str, Marker] = {
    "treg_pct": Marker(4.5, 0.25, 0.25),
    "il10_pg_ml": Marker(6.0, 0.35, 0.45),
    "tgfb1_ng_ml": Marker(20.0, 0.25, 0.30),
    "ifng_pg_ml": Marker(9.0, -0.35, 0.50),
    "il17_pg_ml": Marker(12.0, -0.35, 0.50),
    "baff_pg_ml": Marker(950.0, -0.20, 0.30),
}


@dataclass(frozen=True)
class Scenario:
    """Every generative parameter. Defaults are the "default" scenario; docs/simulator.md
    gives each one's source. `signal` multiplies every effect of the true logit."""

    name: str = "default"
    signal: float = 1.0
    # patients, episodes, treatments (mixes are relative weights, renormalised per episode after
    # removing impossible options: eradication needs H. pylori, splenectomy happens once)
    episodes_per_patient: tuple[float, ...] = (0.75, 0.20, 0.05)  # P(1), P(2), P(3) episodes
    first_line_mix: dict[str, float] = field(default_factory=lambda: {
        "corticosteroid": 0.50, "ivig": 0.15, "tpo_ra": 0.12, "rituximab": 0.07,
        "fostamatinib": 0.03, "splenectomy": 0.03, "h_pylori_eradication": 0.35})
    later_line_mix: dict[str, float] = field(default_factory=lambda: {
        "corticosteroid": 0.15, "ivig": 0.10, "tpo_ra": 0.35, "rituximab": 0.20,
        "fostamatinib": 0.10, "splenectomy": 0.10, "h_pylori_eradication": 0.0})
    # clinical covariates
    female_fraction: float = 0.60
    age_mean: float = 50.0
    age_sd: float = 18.0
    age_range: tuple[float, float] = (18.0, 90.0)
    phase_mix: tuple[float, float, float] = (0.50, 0.20, 0.30)  # new, persistent, chronic
    chronic_max_months: float = 240.0
    prior_lines_by_phase: tuple[float, float, float] = (0.1, 1.0, 2.5)
    median_months_between_episodes: float = 4.0
    months_between_log_sd: float = 0.7
    extra_lines_between_episodes: float = 0.3
    platelet_median: float = 15.0
    platelet_log_sd: float = 0.6
    who_grade_probs: tuple[float, ...] = (0.30, 0.38, 0.22, 0.08, 0.02)
    bleeding_platelet_slope: float = 0.9
    itp_bat_fraction: float = 0.10
    h_pylori_fraction: float = 0.20
    antibiotics_fraction: float = 0.15
    anti_gpib_fraction: float = 0.30
    ipf_median: float = 9.0
    ipf_log_sd: float = 0.5
    ipf_platelet_slope: float = -0.2
    tpo_median: float = 50.0
    tpo_log_sd: float = 0.5
    markers: dict[str, Marker] = field(default_factory=lambda: dict(DEFAULT_MARKERS))
    immune_missing: float = 0.12
    clinical_missing: dict[str, float] = field(default_factory=lambda: {
        "ipf_pct": 0.08, "tpo_pg_ml": 0.10, "anti_gpib": 0.10, "h_pylori": 0.05,
        "bleeding_score": 0.03, "antibiotics_3m": 0.03})
    # microbiome
    n_batches: int = 4
    library_log10_range: tuple[float, float] = (3.5, 5.0)
    theta: float = 0.008
    enterotype_weights: tuple[float, float, float, float] = (0.40, 0.15, 0.30, 0.15)  # ENTEROTYPES
    # ln-abundance and logit-prevalence shifts of genus groups (ENTEROTYPES, ROLES)
    enterotype_offsets: dict[str, dict[str, float]] = field(default_factory=lambda: {
        "bacteroides": {"bacteroides": 1.5, "prevotella": -2.0},
        "prevotella": {"prevotella": 3.0, "bacteroides": -1.5},
        "firmicutes": {"firmicutes": 1.5, "bacteroides": -1.0, "prevotella": -1.0},
        "dysbiotic": {"inflammatory": 2.0, "scfa": -1.5, "firmicutes": -1.0}})
    patient_sd: float = 0.7
    episode_sd: float = 0.5
    z_scfa: float = 0.6
    z_inflammatory: float = -0.6
    antibiotic_scfa: float = -1.0
    antibiotic_dropout: float = 0.3
    species_prevalence: float = 0.5
    species_concentration: float = 2.0
    signature_genera: tuple[str, ...] = ("Bacteroides", "Parabacteroides")
    # "dirichlet_multinomial": reads ~ DM(composition, theta); "logistic_normal": extra
    # Gaussian noise of sd `logistic_normal_sd` on log abundances, then multinomial reads
    count_model: str = "dirichlet_multinomial"
    logistic_normal_sd: float = 0.8
    mediators: tuple[Mediator, ...] = ()
    # response
    response_rates: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_RATES))
    effects: tuple[Effect, ...] = DEFAULT_EFFECTS
    cr_fraction: float = 0.55
    steroid_dependent_fraction: float = 0.30
    nr_mix: tuple[float, float, float] = (0.60, 0.25, 0.15)  # < 30, < 2x baseline, bleeding
    nr_low_bleeding: float = 0.30
    followup_days: dict[str, tuple[int, int]] = field(default_factory=lambda: {
        "corticosteroid": (14, 28), "ivig": (2, 7), "tpo_ra": (28, 56),
        "rituximab": (56, 90), "fostamatinib": (56, 84), "splenectomy": (28, 60),
        "h_pylori_eradication": (90, 180)})


CLINICAL_EFFECTS: tuple[Effect, ...] = tuple(
    e for e in DEFAULT_EFFECTS if e.feature not in ("scfa_balance", "signature"))
FEW_STRONG_TAXA: tuple[Effect, ...] = (
    Effect("taxon:Faecalibacterium", 0.9, (), "assumption: butyrate producer, per 10-fold"),
    Effect("taxon:Bacteroides", 0.7, ("corticosteroid",),
           "domain 4: Liu 2025 Bacteroides species; direction assumed"),
    Effect("taxon:Streptococcus", -0.6, (), "assumption: oral-type pathobiont, per 10-fold"),
)
WEAK_TAXA: tuple[str, ...] = (
    "Blautia", "Roseburia", "Anaerostipes", "Coprococcus", "Dorea", "Lachnospira",
    "Ruminococcus", "Subdoligranulum", "Oscillibacter", "Alistipes", "Parabacteroides",
    "Phascolarctobacterium", "Dialister", "Akkermansia", "Bifidobacterium", "Collinsella",
    "Eggerthella", "Veillonella", "Enterococcus", "Lactobacillus",
)
MANY_WEAK_TAXA: tuple[Effect, ...] = tuple(
    Effect(f"taxon:{g}", 0.2 if i % 2 == 0 else -0.2, (), "assumption: many weak effects")
    for i, g in enumerate(WEAK_TAXA))

# Scenarios vary the generative form, not only the signal strength (docs/simulator.md).
SCENARIOS: dict[str, Scenario] = {
    "default": Scenario(),
    "null": Scenario(name="null", signal=0.0,
                     response_rates=dict.fromkeys(schema.TREATMENTS, 0.65)),
    "strong": Scenario(name="strong", signal=2.0),
    "few_strong_taxa": Scenario(name="few_strong_taxa",
                                effects=CLINICAL_EFFECTS + FEW_STRONG_TAXA),
    "many_weak_taxa": Scenario(name="many_weak_taxa", effects=CLINICAL_EFFECTS + MANY_WEAK_TAXA),
    "logistic_normal": Scenario(name="logistic_normal", count_model="logistic_normal",
                                effects=CLINICAL_EFFECTS + FEW_STRONG_TAXA),
    "mediated": Scenario(name="mediated",
                         mediators=(Mediator("Faecalibacterium", "treg_pct", 0.5),),
                         effects=(*CLINICAL_EFFECTS[:7],
                                  Effect("std_log_treg_pct", 0.8, (),
                                         "assumption: Treg mediates the SCFA-producer effect"),
                                  *CLINICAL_EFFECTS[8:])),
    "rate50": Scenario(name="rate50", response_rates=dict.fromkeys(schema.TREATMENTS, 0.50),
                       effects=CLINICAL_EFFECTS + FEW_STRONG_TAXA),
    "rate95": Scenario(name="rate95", response_rates=dict.fromkeys(schema.TREATMENTS, 0.95),
                       effects=CLINICAL_EFFECTS + FEW_STRONG_TAXA),
}


def get_scenario(name: str, signal: float | None = None) -> Scenario:
    """A named scenario, optionally with its signal overridden (the CLI's --signal)."""
    if name not in SCENARIOS:
        raise ValueError(f"unknown scenario {name!r}; expected one of {sorted(SCENARIOS)}")
    scenario = SCENARIOS[name]
    return scenario if signal is None else replace(scenario, signal=float(signal))


@dataclass(frozen=True)
class SimulatedCohort:
    """The four output files in memory: metadata cells exactly as written ("" = missing),
    reads (species-level taxa x samples), truth.tsv rows and the truth.json document."""

    metadata: pd.DataFrame
    feature_table: pd.DataFrame
    truth: pd.DataFrame
    info: dict[str, Any]


@cache
def load_genera() -> pd.DataFrame:
    """The genus catalogue shipped as package data (one row per genus)."""
    path = resources.files("training") / "data" / "genera.tsv"
    with path.open(encoding="utf-8") as fh:
        genera = pd.read_csv(fh, sep="\t", dtype=str, keep_default_na=False)
    genera["prevalence"] = genera["prevalence"].astype(float)
    genera["log10_abundance"] = genera["log10_abundance"].astype(float)
    genera["genus"] = genera["lineage"].str.rsplit("g__", n=1).str[-1]
    return genera


def simulate(n_patients: int, seed: int, scenario: Scenario) -> SimulatedCohort:
    """Simulate one cohort; pure (same arguments, same cohort)."""
    if n_patients < 1:
        raise ValueError("n_patients must be >= 1")
    rng = np.random.default_rng(seed)
    genera = load_genera()
    patients = _patients(rng, n_patients, scenario)
    episodes = _episodes(rng, patients, scenario)
    composition = _composition(rng, patients, episodes, genera, scenario)
    _mediate(episodes, composition, genera, scenario)
    reads = _species_reads(rng, _genus_reads(rng, composition, scenario), episodes, genera,
                           scenario)
    treatment = episodes[schema.TREATMENT].to_numpy()
    logit = _linear_predictor(_features(episodes, composition, genera, scenario), treatment,
                              scenario)
    intercepts = _intercepts(logit, treatment, scenario.response_rates)
    probability = special.expit(logit + episodes[schema.TREATMENT].map(intercepts).to_numpy())
    responded = rng.random(len(episodes)) < probability
    outcomes = _outcomes(rng, responded, episodes, scenario)
    missing = _missing_mask(rng, episodes, scenario)
    truth = pd.DataFrame({
        schema.SAMPLE_ID: episodes[schema.SAMPLE_ID],
        schema.SUBJECT_ID: episodes[schema.SUBJECT_ID],
        schema.TREATMENT: treatment,
        "true_probability": probability,
        "responded": responded.astype(int),
        "response": outcomes.pop("response"),
    })
    return SimulatedCohort(
        metadata=_format_metadata(episodes, outcomes, missing),
        feature_table=pd.DataFrame(reads.T, index=_taxon_ids(genera),
                                   columns=episodes[schema.SAMPLE_ID].to_list()),
        truth=truth,
        info=_info(n_patients, seed, scenario, intercepts, truth),
    )


def write_cohort(cohort: SimulatedCohort, out: Path) -> None:
    """Write metadata.tsv, feature-table.tsv (biom --to-tsv layout), truth.tsv, truth.json."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cohort.metadata.to_csv(out / "metadata.tsv", sep="\t", index=False, lineterminator="\n")
    with (out / "feature-table.tsv").open("w", encoding="utf-8", newline="") as fh:
        fh.write("# Constructed from biom file\n")
        fh.write("\t".join(["#OTU ID", *cohort.feature_table.columns]) + "\n")
        cohort.feature_table.to_csv(fh, sep="\t", header=False, lineterminator="\n")
    cohort.truth.to_csv(out / "truth.tsv", sep="\t", index=False, float_format="%.6f",
                        lineterminator="\n")
    (out / "truth.json").write_text(
        json.dumps(cohort.info, sort_keys=True, indent=2) + "\n", encoding="utf-8")


# --- patients and episodes -------------------------------------------------------------------

def _normalised(weights: Any) -> np.ndarray:
    weights = np.asarray(weights, dtype=float)
    return weights / weights.sum()


def _choose(rng: np.random.Generator, weights: np.ndarray) -> np.ndarray:
    """Row-wise categorical draw from unnormalised weights (Generator.choice takes one p)."""
    cumulative = np.cumsum(weights, axis=1)
    u = rng.random(len(weights))[:, None] * cumulative[:, -1:]
    return (u >= cumulative).sum(axis=1)


def _patients(rng: np.random.Generator, n: int, sc: Scenario) -> pd.DataFrame:
    """Patient-level state shared by all of a patient's episodes (why CV must group)."""
    return pd.DataFrame({
        "z": rng.standard_normal(n),
        "female": rng.random(n) < sc.female_fraction,
        "age0": np.clip(rng.normal(sc.age_mean, sc.age_sd, n), *sc.age_range),
        "h_pylori": rng.random(n) < sc.h_pylori_fraction,
        "anti_gpib": rng.random(n) < sc.anti_gpib_fraction,
        "enterotype": rng.choice(len(ENTEROTYPES), n, p=_normalised(sc.enterotype_weights)),
        "n_episodes": 1 + rng.choice(len(sc.episodes_per_patient), n,
                                     p=_normalised(sc.episodes_per_patient)),
        "phase": rng.choice(3, n, p=_normalised(sc.phase_mix)),
    })


def _treatments(rng: np.random.Generator, patients: pd.DataFrame, sc: Scenario) -> np.ndarray:
    """(patients x episode slots) treatment codes; later lines lean second-line, eradication
    only for infected patients, splenectomy at most once."""
    n, slots = len(patients), len(sc.episodes_per_patient)
    first = np.array([sc.first_line_mix.get(t, 0.0) for t in schema.TREATMENTS])
    later = np.array([sc.later_line_mix.get(t, 0.0) for t in schema.TREATMENTS])
    eradication = schema.TREATMENTS.index("h_pylori_eradication")
    splenectomy = schema.TREATMENTS.index("splenectomy")
    codes = np.zeros((n, slots), dtype=int)
    splenectomised = np.zeros(n, dtype=bool)
    for k in range(slots):
        weights = np.tile(first if k == 0 else later, (n, 1))
        weights[:, eradication] *= patients["h_pylori"].to_numpy()
        weights[:, splenectomy] *= ~splenectomised
        codes[:, k] = _choose(rng, weights)
        splenectomised |= codes[:, k] == splenectomy
    return codes


def _timeline(rng: np.random.Generator, patients: pd.DataFrame, sc: Scenario) -> pd.DataFrame:
    """Episode skeleton: whose, which treatment, when (months since diagnosis, prior lines)."""
    n, slots = len(patients), len(sc.episodes_per_patient)
    phase = patients["phase"].to_numpy()
    codes = _treatments(rng, patients, sc)
    low = np.array([0.0, 3.0, 12.0])[phase]
    high = np.array([3.0, 12.0, sc.chronic_max_months])[phase]
    u = rng.random(n)
    first = np.where(phase == 2, 12.0 * (high / 12.0) ** u, low + u * (high - low))
    gaps = rng.lognormal(math.log(sc.median_months_between_episodes), sc.months_between_log_sd,
                         (n, slots))
    gaps[:, 0] = 0.0
    months = first[:, None] + np.cumsum(gaps, axis=1)
    new_lines = 1 + rng.poisson(sc.extra_lines_between_episodes, (n, slots))
    new_lines[:, 0] = 0
    lines = rng.poisson(np.array(sc.prior_lines_by_phase)[phase])[:, None] + np.cumsum(
        new_lines, axis=1)
    pid, slot = np.nonzero(np.arange(slots)[None, :] < patients["n_episodes"].to_numpy()[:, None])
    width = max(4, len(str(max(n, len(pid)))))
    return pd.DataFrame({
        schema.SAMPLE_ID: [f"S{i:0{width}d}" for i in range(1, len(pid) + 1)],
        schema.SUBJECT_ID: [f"P{p:0{width}d}" for p in pid + 1],
        "patient": pid,
        "episode": slot,
        schema.TREATMENT: np.array(schema.TREATMENTS)[codes[pid, slot]],
        "age_years": np.round(patients["age0"].to_numpy()[pid]
                              + (months[pid, slot] - first[pid]) / 12),
        "sex": np.where(patients["female"].to_numpy()[pid], "female", "male"),
        "months_since_diagnosis": np.round(months[pid, slot], 1),
        "prior_lines": np.clip(lines[pid, slot], 0, 30),
        "h_pylori": patients["h_pylori"].to_numpy()[pid],
        "anti_gpib": patients["anti_gpib"].to_numpy()[pid],
    })


def _episodes(rng: np.random.Generator, patients: pd.DataFrame, sc: Scenario) -> pd.DataFrame:
    """One row per treatment episode with complete (pre-masking), rounded clinical values."""
    episodes = _timeline(rng, patients, sc)
    s = len(episodes)
    platelets = _round_to_schema(sc.platelet_median * np.exp(
        sc.platelet_log_sd * rng.standard_normal(s)), "baseline_platelets")
    log_ratio = np.log(platelets / sc.platelet_median)
    grade = _who_grade(rng, log_ratio, sc)
    scale = np.where(rng.random(s) < sc.itp_bat_fraction, "ITP-BAT", "WHO")
    episodes["baseline_platelets"] = platelets
    episodes["bleeding_grade"] = grade
    episodes["bleeding_scale"] = scale
    episodes["bleeding_score"] = _bleeding_scores(rng, grade, scale)
    episodes["antibiotics_3m"] = rng.random(s) < sc.antibiotics_fraction
    episodes["ipf_pct"] = _lognormal(rng, sc.ipf_median, sc.ipf_log_sd,
                                     sc.ipf_platelet_slope * log_ratio, "ipf_pct")
    episodes["tpo_pg_ml"] = _lognormal(rng, sc.tpo_median, sc.tpo_log_sd, np.zeros(s),
                                       "tpo_pg_ml")
    z = patients["z"].to_numpy()[episodes["patient"].to_numpy()]
    for name in IMMUNE_MARKERS:
        m = sc.markers[name]
        episodes[name] = _lognormal(rng, m.median, m.noise_sd, m.z_loading * z, name)
    episodes[BATCH] = np.char.add("B", (1 + rng.integers(0, sc.n_batches, s)).astype(str))
    return episodes


def _lognormal(rng: np.random.Generator, median: float, sd: float, shift: np.ndarray,
               name: str) -> np.ndarray:
    """Log-normal values rounded as written and kept inside the schema's range."""
    values = median * np.exp(shift + sd * rng.standard_normal(len(shift)))
    return _round_to_schema(values, name)


def _round_to_schema(values: np.ndarray, name: str) -> np.ndarray:
    spec, decimals = schema.FIELDS_BY_NAME[name], DECIMALS[name]
    smallest = 10.0 ** -decimals
    return np.clip(np.round(values, decimals), max(spec.minimum or 0.0, smallest), spec.maximum)


def _who_grade(rng: np.random.Generator, log_ratio: np.ndarray, sc: Scenario) -> np.ndarray:
    """WHO grade 0-4 from a latent that rises as platelets fall, cut at the quantiles that give
    `who_grade_probs` marginally."""
    latent = -sc.bleeding_platelet_slope * log_ratio + rng.standard_normal(len(log_ratio))
    scale = math.hypot(sc.bleeding_platelet_slope * sc.platelet_log_sd, 1.0)
    cuts = stats.norm.ppf(np.cumsum(_normalised(sc.who_grade_probs))[:-1]) * scale
    return np.digitize(latent, cuts)


def _bleeding_scores(rng: np.random.Generator, grade: np.ndarray,
                     scale: np.ndarray) -> np.ndarray:
    """WHO grade as text, or an ITP-BAT string whose worst domain equals the grade, so the
    severity (schema.bleeding_severity) does not depend on the scale."""
    u = rng.random((len(grade), 2))
    mucosa = np.floor(u[:, 0] * (grade + 1)).astype(int)
    organ = np.floor(u[:, 1] * grade).astype(int)
    bat = [f"S{g}M{m}O{o}" for g, m, o in zip(grade, mucosa, organ, strict=True)]
    return np.where(scale == "ITP-BAT", bat, grade.astype(str))


# --- microbiome ------------------------------------------------------------------------------

def _groups(genera: pd.DataFrame) -> dict[str, np.ndarray]:
    """Genus membership of every group an offset can target: enterotype markers and roles."""
    groups = {r: (genera["role"] == r).to_numpy() for r in ROLES}
    groups.update({e: (genera["enterotype"] == e).to_numpy() for e in ENTEROTYPES})
    return groups


def _composition(rng: np.random.Generator, patients: pd.DataFrame, episodes: pd.DataFrame,
                 genera: pd.DataFrame, sc: Scenario) -> np.ndarray:
    """True genus proportions per sample (rows sum to 1; structural zeros are exact 0)."""
    groups = _groups(genera)
    n, g = len(patients), len(genera)
    offsets = np.zeros((len(ENTEROTYPES), g))
    for k, enterotype in enumerate(ENTEROTYPES):
        for group, shift in sc.enterotype_offsets.get(enterotype, {}).items():
            offsets[k] += shift * groups[group]
    patient_offset = offsets[patients["enterotype"].to_numpy()]
    scfa, inflammatory = groups["scfa"], groups["inflammatory"]
    immune = np.outer(patients["z"].to_numpy(), sc.z_scfa * scfa + sc.z_inflammatory * inflammatory)
    prevalence = special.expit(special.logit(genera["prevalence"].to_numpy()) + patient_offset)
    present_in_patient = rng.random((n, g)) < prevalence
    patient_effect = patient_offset + immune + rng.normal(0.0, sc.patient_sd, (n, g))

    pid = episodes["patient"].to_numpy()
    antibiotics = episodes["antibiotics_3m"].to_numpy()[:, None]
    dropped = antibiotics & ~inflammatory & (rng.random((len(pid), g)) < sc.antibiotic_dropout)
    present = present_in_patient[pid] & ~dropped
    present[~present.any(axis=1), np.argmax(genera["prevalence"].to_numpy())] = True
    log_abundance = (math.log(10) * genera["log10_abundance"].to_numpy() + patient_effect[pid]
                     + antibiotics * sc.antibiotic_scfa * scfa
                     + rng.normal(0.0, sc.episode_sd, (len(pid), g)))
    return special.softmax(np.where(present, log_abundance, -np.inf), axis=1)


def _genus_reads(rng: np.random.Generator, composition: np.ndarray, sc: Scenario) -> np.ndarray:
    """Dirichlet-multinomial reads with overdispersion theta and log-uniform library sizes.

    The Dirichlet is drawn as normalised gammas because Generator.dirichlet takes one alpha.
    """
    lo, hi = sc.library_log10_range
    depth = np.round(10.0 ** rng.uniform(lo, hi, len(composition))).astype(np.int64)
    if sc.count_model == "logistic_normal":
        noise = rng.normal(0.0, sc.logistic_normal_sd, composition.shape)
        with np.errstate(divide="ignore"):
            weights = special.softmax(np.log(composition) + noise, axis=1)
        return rng.multinomial(depth, weights)
    if sc.count_model != "dirichlet_multinomial":
        raise ValueError(f"unknown count_model {sc.count_model!r}")
    weights = rng.gamma(composition * (1.0 - sc.theta) / sc.theta)
    return rng.multinomial(depth, weights / weights.sum(axis=1, keepdims=True))


def _species_slots(genera: pd.DataFrame) -> np.ndarray:
    counts = genera["species"].str.split(",").str.len().to_numpy()
    return np.arange(MAX_SPECIES)[None, :] < counts[:, None]


def _species_reads(rng: np.random.Generator, genus_reads: np.ndarray, episodes: pd.DataFrame,
                   genera: pd.DataFrame, sc: Scenario) -> np.ndarray:
    """Split each genus's reads over its 1-3 species; secondary species are absent from some
    patients, so the species table is sparser than the genus table."""
    slots = _species_slots(genera)
    base = rng.gamma(1.0, size=slots.shape) * slots
    base = -np.sort(-base / base.sum(axis=1, keepdims=True), axis=1)  # dominant species first
    n_patients = episodes["patient"].max() + 1
    present = rng.random((n_patients, *slots.shape)) < sc.species_prevalence
    present[..., 0] = True
    pid = episodes["patient"].to_numpy()
    weights = rng.gamma(sc.species_concentration * base[None],
                        size=(len(pid), *slots.shape)) * present[pid] * slots
    weights[..., 0] = np.maximum(weights[..., 0], np.finfo(float).tiny)
    reads = rng.multinomial(genus_reads, weights / weights.sum(axis=-1, keepdims=True))
    return reads[:, slots]


def _taxon_ids(genera: pd.DataFrame) -> list[str]:
    return [f"{lineage};s__{species}"
            for lineage, names in zip(genera["lineage"], genera["species"], strict=True)
            for species in names.split(",")]


# --- ground truth ----------------------------------------------------------------------------

def _features(episodes: pd.DataFrame, composition: np.ndarray, genera: pd.DataFrame,
              sc: Scenario) -> pd.DataFrame:
    """The true logit's inputs, from complete observed values (see FEATURES)."""
    groups = _groups(genera)
    signature = genera["genus"].isin(sc.signature_genera).to_numpy()
    total = {name: composition[:, mask].sum(axis=1) + PSEUDO_ABUNDANCE
             for name, mask in {**groups, "signature": signature}.items()}
    severity = [schema.bleeding_severity(score, scale) for score, scale in
                zip(episodes["bleeding_score"], episodes["bleeding_scale"], strict=True)]
    features = {
        "age_per_10y": (episodes["age_years"] - 50.0) / 10.0,
        "bleeding_severity": np.asarray(severity),
        "log2_ipf": np.log2(episodes["ipf_pct"] / 9.0),
        "anti_gpib": episodes["anti_gpib"].astype(float),
        "tpo_per_10": (episodes["tpo_pg_ml"] - 50.0) / 10.0,
        "log2_months": np.log2(1.0 + episodes["months_since_diagnosis"]),
        "scfa_balance": np.log(total["scfa"]) - np.log(total["inflammatory"]),
        "signature": np.log(total["signature"]),
    }
    for name in IMMUNE_MARKERS:
        m = sc.markers[name]
        features[f"std_log_{name}"] = (np.log(episodes[name]) - math.log(m.median)) / m.log_sd
    for feature in {e.feature for e in sc.effects if e.feature.startswith(TAXON_FEATURE)}:
        features[feature] = np.log10(_genus_share(composition, genera, feature) +
                                     PSEUDO_ABUNDANCE)
    return pd.DataFrame({k: np.asarray(v, dtype=float) for k, v in features.items()})


def _genus_share(composition: np.ndarray, genera: pd.DataFrame, name: str) -> np.ndarray:
    genus = name.removeprefix(TAXON_FEATURE)
    mask = (genera["genus"] == genus).to_numpy()
    if not mask.any():
        raise ValueError(f"genus {genus!r} is not in the simulator's catalogue (genera.tsv)")
    return composition[:, mask].sum(axis=1)


def _mediate(episodes: pd.DataFrame, composition: np.ndarray, genera: pd.DataFrame,
             sc: Scenario) -> None:
    """Shift immune markers by their mediating genera (in place, rounded as written)."""
    for mediator in sc.mediators:
        level = np.log10(_genus_share(composition, genera, mediator.genus) + PSEUDO_ABUNDANCE)
        z = (level - level.mean()) / (level.std() or 1.0)
        shifted = episodes[mediator.marker] * np.exp(mediator.loading * z)
        episodes[mediator.marker] = _round_to_schema(shifted.to_numpy(), mediator.marker)


def _linear_predictor(features: pd.DataFrame, treatment: np.ndarray,
                      sc: Scenario) -> np.ndarray:
    logit = np.zeros(len(features))
    for effect in sc.effects:
        applies = np.isin(treatment, effect.treatments) if effect.treatments else True
        logit += np.where(applies, sc.signal * effect.beta * features[effect.feature], 0.0)
    return logit


def _intercepts(logit: np.ndarray, treatment: np.ndarray,
                rates: dict[str, float]) -> dict[str, float]:
    """Per-treatment intercepts that make the mean true probability equal the target rate."""
    intercepts = {}
    for t in schema.TREATMENTS:
        x = logit[treatment == t]
        if x.size == 0 or np.ptp(x) == 0:
            intercepts[t] = float(special.logit(rates[t]) - (x[0] if x.size else 0.0))
        else:
            intercepts[t] = float(optimize.brentq(
                lambda a, x=x, r=rates[t]: special.expit(a + x).mean() - r, -40.0, 40.0))
    return intercepts


def _uniform_int(lo: Any, hi: Any, u: np.ndarray) -> np.ndarray:
    return lo + np.floor(u * (np.asarray(hi) - lo + 1))


def _log_uniform(lo: float, hi: float, u: np.ndarray) -> np.ndarray:
    return np.clip(np.round(lo * (hi / lo) ** u), lo, hi)


def iwg_response(platelets: np.ndarray, baseline: np.ndarray, bleeding: np.ndarray,
                 steroid_dependent: np.ndarray) -> np.ndarray:
    """IWG 2009 (domain section 1): CR >= 100 and no bleeding; R >= 30 and >= 2x baseline and no
    bleeding; steroid dependence is NR."""
    ok = ~np.asarray(bleeding, bool) & ~np.asarray(steroid_dependent, bool)
    cr = ok & (platelets >= 100)
    r = ok & ~cr & (platelets >= 30) & (platelets >= 2 * baseline)
    return np.select([cr, r], ["CR", "R"], "NR")


def _outcomes(rng: np.random.Generator, responded: np.ndarray, episodes: pd.DataFrame,
              sc: Scenario) -> dict[str, np.ndarray]:
    """Follow-up columns whose IWG label is exactly `responded` (checked, not assumed)."""
    u = rng.random((len(responded), 6))
    baseline = episodes["baseline_platelets"].to_numpy()
    treatment = episodes[schema.TREATMENT].to_numpy()
    r_low = np.maximum(30, 2 * baseline)
    cr = responded & ((u[:, 0] < sc.cr_fraction) | (r_low > 99))
    partial = responded & ~cr
    dependent = ~responded & (treatment == "corticosteroid") & (
        u[:, 1] < sc.steroid_dependent_fraction)
    kind = _choose(rng, np.tile(sc.nr_mix, (len(responded), 1)))
    rise_high = np.minimum(2 * baseline - 1, 99)
    other_nr = ~responded & ~dependent
    slow_rise = other_nr & (kind == 1) & (rise_high >= 30)
    bleeding_nr = other_nr & (kind == 2)
    low = other_nr & ~slow_rise & ~bleeding_nr
    platelets = np.select(
        [cr, partial, low, slow_rise, bleeding_nr, dependent],
        [_log_uniform(100, 450, u[:, 2]), _uniform_int(r_low, 99, u[:, 2]),
         _uniform_int(1, 29, u[:, 2]), _uniform_int(30, rise_high, u[:, 2]),
         _log_uniform(30, 300, u[:, 2]), _log_uniform(30, 200, u[:, 2])])
    bleeding = bleeding_nr | (low & (u[:, 3] < sc.nr_low_bleeding))
    days = np.array([sc.followup_days[t] for t in treatment]).reshape(-1, 2)
    response = iwg_response(platelets, baseline, bleeding, dependent)
    if not np.array_equal(response != "NR", responded):
        raise AssertionError("simulated follow-up does not reproduce the simulated response")
    return {
        "followup_platelets": platelets,
        "followup_day": _uniform_int(days[:, 0], days[:, 1], u[:, 4]),
        "followup_bleeding": bleeding,
        "steroid_dependent": dependent,
        "response": response,
    }


def auroc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    """AUROC as the Mann-Whitney U over (positives x negatives); None with one class only."""
    labels = np.asarray(labels, bool)
    n_pos, n_neg = labels.sum(), (~labels).sum()
    if n_pos == 0 or n_neg == 0:
        return None
    u = stats.mannwhitneyu(scores[labels], scores[~labels]).statistic
    return float(u / (n_pos * n_neg))


# --- output ----------------------------------------------------------------------------------

def _missing_mask(rng: np.random.Generator, episodes: pd.DataFrame,
                  sc: Scenario) -> dict[str, np.ndarray]:
    """Cells blanked after the truth was computed (truth uses the complete values)."""
    rates = {**sc.clinical_missing, **dict.fromkeys(IMMUNE_MARKERS, sc.immune_missing)}
    mask = {name: rng.random(len(episodes)) < rate for name, rate in rates.items()}
    mask["bleeding_scale"] = mask.get("bleeding_score", np.zeros(len(episodes), bool))
    return mask


def _cells(values: Any, name: str) -> np.ndarray:
    """One column as metadata.tsv text: yes/no, fixed decimals, or the value itself."""
    values = np.asarray(values)
    if values.dtype == bool:
        return np.where(values, schema.YES, schema.NO)
    if name in DECIMALS:
        return np.array([f"{v:.{DECIMALS[name]}f}" for v in values.astype(float)])
    return values.astype(str)


def _format_metadata(episodes: pd.DataFrame, outcomes: dict[str, np.ndarray],
                     missing: dict[str, np.ndarray]) -> pd.DataFrame:
    columns = [schema.SAMPLE_ID, schema.SUBJECT_ID, schema.TREATMENT,
               *(f.name for f in schema.CLINICAL_FIELDS), *OUTCOME_COLUMNS, BATCH]
    source = {**{c: episodes[c].to_numpy() for c in episodes.columns}, **outcomes}
    table = {}
    for name in columns:
        cells = _cells(source[name], name)
        table[name] = np.where(missing[name], "", cells) if name in missing else cells
    return pd.DataFrame(table, dtype=str)


def _rounded(obj: Any, digits: int = 6) -> Any:
    """JSON-ready copy with floats rounded, so truth.json is short and stable."""
    if isinstance(obj, dict):
        return {str(k): _rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_rounded(v, digits) for v in obj]
    if isinstance(obj, float | np.floating):
        return None if math.isnan(obj) else round(float(obj), digits)
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def _info(n_patients: int, seed: int, sc: Scenario, intercepts: dict[str, float],
          truth: pd.DataFrame) -> dict[str, Any]:
    by_treatment = truth.groupby(schema.TREATMENT)
    coefficients = [{
        "name": e.name, "feature": e.feature, "definition": feature_definition(e.feature),
        "treatments": list(e.treatments or schema.TREATMENTS), "beta": sc.signal * e.beta,
        "direction": "up" if e.beta * sc.signal > 0 else "down" if e.beta * sc.signal < 0
        else "none", "source": e.source,
    } for e in sc.effects]
    return _rounded({
        "format_version": 1,
        "seed": seed,
        "n_patients": n_patients,
        "n_episodes": len(truth),
        "scenario": asdict(sc),
        "coefficients": coefficients,
        "intercepts": intercepts,
        "target_response_rates": sc.response_rates,
        "realised_response_rates": by_treatment["responded"].mean().to_dict(),
        "mean_true_probability": by_treatment["true_probability"].mean().to_dict(),
        "episodes_by_treatment": by_treatment.size().to_dict(),
        "overall_response_rate": truth["responded"].mean(),
        "best_auroc": auroc(truth["responded"].to_numpy(), truth["true_probability"].to_numpy()),
        "truth_uses": "complete values before missing cells were blanked; genus composition "
                      "before read sampling",
    })


# --- oracle ----------------------------------------------------------------------------------

MICROBIOME_TERMS: tuple[str, ...] = ("scfa_balance", "signature")


def is_microbiome_term(feature: str) -> bool:
    """A term computed from the microbiome (directly, not through a mediating marker)."""
    return feature in MICROBIOME_TERMS or feature.startswith(TAXON_FEATURE)


def oracle_design(metadata: pd.DataFrame, feature_table: pd.DataFrame, scenario: Scenario,
                  microbiome: bool = True) -> pd.DataFrame:
    """The true logit's terms, computed from what a model can observe.

    Same formulas as the simulator's truth (`FEATURES`), but from the written metadata (with
    its missing cells) and from the read counts (genus proportions of the sampled reads, not
    the true composition); one column per effect (feature x its treatments) plus treatment
    indicators. A correctly specified model fitted on these columns (`oracle_model`) is what
    is achievable at a given sample size: the yardstick for the product's models.
    """
    genera = load_genera()
    numeric = metadata.replace("", np.nan)
    episodes = pd.DataFrame({
        "age_years": pd.to_numeric(numeric["age_years"]),
        "bleeding_score": metadata["bleeding_score"],
        "bleeding_scale": metadata["bleeding_scale"].replace("", None),
        "ipf_pct": pd.to_numeric(numeric["ipf_pct"]),
        "anti_gpib": numeric["anti_gpib"].map({schema.YES: 1.0, schema.NO: 0.0}),
        "tpo_pg_ml": pd.to_numeric(numeric["tpo_pg_ml"]),
        "months_since_diagnosis": pd.to_numeric(numeric["months_since_diagnosis"]),
        **{m: pd.to_numeric(numeric[m]) for m in IMMUNE_MARKERS},
    }).reset_index(drop=True)
    genus_of = pd.Series([lineage for lineage, names in zip(genera["lineage"], genera["species"],
                                                            strict=True)
                          for _ in names.split(",")], index=_taxon_ids(genera))
    reads = feature_table.groupby(genus_of.reindex(feature_table.index).to_numpy()).sum()
    reads = reads.reindex(genera["lineage"], fill_value=0).T.to_numpy(dtype=float)
    composition = reads / np.maximum(reads.sum(axis=1, keepdims=True), 1.0)
    features = _features(episodes, composition, genera, scenario)
    treatment = metadata[schema.TREATMENT].to_numpy()
    columns = {f"treatment={t}": (treatment == t).astype(float) for t in schema.TREATMENTS
               if (treatment == t).any()}
    for effect in scenario.effects:
        if effect.beta == 0 or (not microbiome and is_microbiome_term(effect.feature)):
            continue
        applies = np.isin(treatment, effect.treatments) if effect.treatments else True
        columns[effect.name] = np.where(applies, features[effect.feature].to_numpy(), 0.0)
    return pd.DataFrame(columns, index=metadata.index)


def oracle_model() -> Any:
    """Median imputation + (almost) unpenalised logistic regression: the correctly specified
    model of `oracle_design`'s columns."""
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    return make_pipeline(SimpleImputer(strategy="median"),
                         LogisticRegression(C=100.0, max_iter=5000))
