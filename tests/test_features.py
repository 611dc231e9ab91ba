"""Feature pipeline: lineage parsing, taxonomy alignment, compositional steps, clinical
encoding, and the no-leakage / sklearn-convention guarantees the cross-validation relies on."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy.stats import entropy
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.pipeline import Pipeline
from sklearn.utils.validation import check_is_fitted

from tests.helpers import GENERA, clinical_frame, counts_frame, raw_frame, sample_index
from training.features import (
    CLR,
    AlphaDiversity,
    ClinicalEncoder,
    Closure,
    PrevalenceFilter,
    TaxonomyAligner,
    lineage_at_rank,
    model_input,
)
from training.model import FAMILIES, FeatureConfig
from training.schema import is_taxon

FAECALI = (
    "d__Bacteria;p__Firmicutes;c__Clostridia;o__Eubacteriales;f__Oscillospiraceae;"
    "g__Faecalibacterium"
)
BACTEROIDES = "d__Bacteria;p__Bacteroidota;c__Bacteroidia;o__Bacteroidales;f__Bacteroidaceae"
BACTEROIDES_G = f"{BACTEROIDES};g__Bacteroides"
LACHNO_F = "d__Bacteria;p__Firmicutes;c__Clostridia;o__Lachnospirales;f__Lachnospiraceae"

# --------------------------------------------------------------------------- lineage_at_rank


@pytest.mark.parametrize(
    "taxon",
    [
        FAECALI,
        f"{FAECALI};s__Faecalibacterium_prausnitzii",
        "k__Bacteria|p__Firmicutes|c__Clostridia|o__Eubacteriales|f__Oscillospiraceae|"
        "g__Faecalibacterium|s__Faecalibacterium_prausnitzii|t__SGB15316",
        "d__Bacteria; p__Firmicutes; c__Clostridia; o__Eubacteriales; f__Oscillospiraceae; "
        "g__Faecalibacterium; s__prausnitzii",
    ],
)
def test_lineage_spellings_share_one_genus(taxon: str) -> None:
    """SILVA, MetaPhlAn (k__, |, strain) and spaced spellings land on one feature."""
    assert lineage_at_rank(taxon) == FAECALI


@pytest.mark.parametrize(
    "taxon",
    [f"{LACHNO_F};g__", f"{LACHNO_F};g__;s__", LACHNO_F, f"{LACHNO_F};g__ ;s__"],
)
def test_lineage_without_genus_keeps_family(taxon: str) -> None:
    """Unclassified members stay their own feature at the deepest named level."""
    assert lineage_at_rank(taxon) == LACHNO_F


def test_lineage_at_family_and_species() -> None:
    """Other ranks truncate at that rank; the strain level never survives."""
    species = f"{FAECALI}|s__Faecalibacterium_prausnitzii|t__SGB1".replace(";", "|")
    assert lineage_at_rank(species, "family") == FAECALI.rsplit(";", 1)[0]
    assert lineage_at_rank(species, "species") == f"{FAECALI};s__Faecalibacterium_prausnitzii"
    assert lineage_at_rank("k__Bacteria|p__Firmicutes", "phylum") == "d__Bacteria;p__Firmicutes"


# --------------------------------------------------------------------------- TaxonomyAligner


def _aligner_frame(taxa: dict[str, list[float]], n: int = 3) -> pd.DataFrame:
    clinical = {"treatment": ["ivig"] * n, "baseline_platelets": [10.0, 20.0, 30.0][:n]}
    return pd.DataFrame({**clinical, **taxa}, index=sample_index(n))


FRAGILIS = f"{BACTEROIDES_G};s__Bacteroides_fragilis"
OVATUS = f"{BACTEROIDES_G};s__Bacteroides_ovatus"


def _species_and_genus_rows() -> pd.DataFrame:
    """Two species of one genus (one in MetaPhlAn's spelling), reads of that genus not
    named at species, and another genus."""
    return _aligner_frame({
        "k__Bacteria|p__Bacteroidota|c__Bacteroidia|o__Bacteroidales|f__Bacteroidaceae|"
        "g__Bacteroides|s__Bacteroides_fragilis": [1.0, 2.0, 0.0],
        OVATUS: [10.0, 0.0, 3.0],
        BACTEROIDES_G: [100.0, 7.0, 0.0],
        FAECALI: [5.0, 0.0, 9.0],
    })


def test_aligner_sums_species_into_genus() -> None:
    """Several species rows (any spelling) and a genus-level row add up exactly."""
    out = TaxonomyAligner().fit_transform(_species_and_genus_rows())
    assert list(out.columns) == ["treatment", "baseline_platelets", BACTEROIDES_G, FAECALI]
    assert out[BACTEROIDES_G].tolist() == [111.0, 9.0, 3.0]
    assert out[FAECALI].tolist() == [5.0, 0.0, 9.0]


def test_both_ranks_count_a_species_for_its_genus_and_itself() -> None:
    """`both`: genus columns hold every read of the genus (species and genus-level rows), and
    species columns only reads named at species, so no genus is counted twice."""
    X = _species_and_genus_rows()
    aligner = TaxonomyAligner(rank="both").fit(X)
    out = aligner.transform(X)
    assert list(out.columns) == ["treatment", "baseline_platelets", BACTEROIDES_G, FRAGILIS,
                                 OVATUS, FAECALI]
    assert out[BACTEROIDES_G].tolist() == [111.0, 9.0, 3.0]
    assert out[FRAGILIS].tolist() == [1.0, 2.0, 0.0]
    assert out[OVATUS].tolist() == [10.0, 0.0, 3.0]
    assert aligner.matched_share(X).tolist() == [1.0, 1.0, 1.0]  # each read once, not twice
    novel = f"{BACTEROIDES_G};s__Bacteroides_novus"  # a new species of a known genus
    assert aligner.unknown_taxa({novel: 5.0, FAECALI: 5.0}) == {}
    assert aligner.unknown_taxa({"d__Bacteria;g__Novelgenus;s__Novelgenus_x": 1.0}) == {
        "d__Bacteria;g__Novelgenus;s__Novelgenus_x": 1.0}


def test_both_ranks_are_two_compositions() -> None:
    """Each rank of `both` is closed and CLR-transformed on its own (each block's CLR sums
    to 0); diversity comes from the genus composition, as at rank genus."""
    X = raw_frame(40, 3, [*GENERA[:3], f"{GENERA[0]};s__{GENERA[0].rsplit('__', 1)[1]}_alpha",
                          f"{GENERA[1]};s__{GENERA[1].rsplit('__', 1)[1]}_beta"])
    both, genus = (FAMILIES["linear"].build(FeatureConfig(rank=rank, min_prevalence=0), 0)[:2]
                   .fit_transform(X) for rank in ("both", "genus"))
    species = [c for c in both.columns if ";s__" in c]
    genera = [c for c in both.columns if is_taxon(c) and c not in species]
    assert len(species) == 2 and genera == [c for c in genus.columns if is_taxon(c)]
    np.testing.assert_allclose(both[species].sum(axis=1), 0.0, atol=1e-12)
    pd.testing.assert_frame_equal(both[genera], genus[genera])
    pd.testing.assert_frame_equal(both[["shannon_diversity", "observed_genera"]],
                                  genus[["shannon_diversity", "observed_genera"]])


def test_aligner_vocabulary_is_learned_in_fit_only() -> None:
    """New taxa at transform are left out; known taxa a sample lacks read as zero."""
    aligner = TaxonomyAligner().fit(_aligner_frame({FAECALI: [1, 2, 3], BACTEROIDES_G: [0, 4, 0],
                                                    LACHNO_F: [0, 0, 0]}))
    assert aligner.vocabulary_ == sorted([FAECALI, BACTEROIDES_G])  # no reads -> not learned
    novel = "d__Bacteria;p__Proteobacteria;g__Escherichia"
    out = aligner.transform(_aligner_frame({BACTEROIDES_G: [5, 6, 7], novel: [1, 1, 1]}))
    assert list(out.columns) == ["treatment", "baseline_platelets", *aligner.vocabulary_]
    assert out[FAECALI].tolist() == [0.0, 0.0, 0.0]
    assert out[BACTEROIDES_G].tolist() == [5.0, 6.0, 7.0]
    assert list(aligner.get_feature_names_out()) == list(out.columns)


def test_aligner_reports_unknown_taxa_shares() -> None:
    """Unknown taxa are reported with their share of all reads, never dropped silently."""
    aligner = TaxonomyAligner().fit(_aligner_frame({FAECALI: [1, 1, 1]}))
    novel_a = "d__Bacteria;p__Proteobacteria;g__Escherichia"
    novel_b = "k__Bacteria|p__Proteobacteria|g__Klebsiella|s__Klebsiella_oxytoca"
    X = _aligner_frame({FAECALI: [30, 0, 5], novel_a: [60, 0, 0], novel_b: [10, 0, 0]})
    report = [aligner.unknown_taxa(row[row.index.map(is_taxon)].to_dict())
              for _, row in X.iterrows()]
    assert report[0] == pytest.approx({novel_a: 0.6, "d__Bacteria;p__Proteobacteria;"
                                       "g__Klebsiella": 0.1}, abs=1e-15)
    assert report[1] == {}  # no reads at all: nothing to report, no NaN
    assert report[2] == {}


def test_aligner_passes_clinical_and_requires_it() -> None:
    """Clinical columns pass unchanged; a request lacking one is refused by name."""
    X = _aligner_frame({FAECALI: [1, 2, 3]})
    aligner = TaxonomyAligner().fit(X)
    pd.testing.assert_frame_equal(aligner.transform(X)[["treatment", "baseline_platelets"]],
                                  X[["treatment", "baseline_platelets"]])
    with pytest.raises(ValueError, match="baseline_platelets"):
        aligner.transform(X.drop(columns="baseline_platelets"))


def test_aligner_rejects_empty_table_and_bad_rank() -> None:
    """Fitting on no reads or an unknown rank fails loudly instead of an empty model."""
    with pytest.raises(ValueError, match="no taxon"):
        TaxonomyAligner().fit(_aligner_frame({FAECALI: [0, 0, 0]}))
    with pytest.raises(ValueError, match="rank"):
        TaxonomyAligner(rank="subgenus").fit(_aligner_frame({FAECALI: [1, 0, 0]}))


# --------------------------------------------------------------- compositional transformers

COUNTS = np.array([[10.0, 20.0, 30.0, 40.0, 0.0], [0.0, 0.0, 5.0, 0.0, 95.0]])


def test_closure_rows_sum_to_one_and_rejects_negatives() -> None:
    """Proportions remove sequencing depth; negative reads are a data error."""
    out = Closure().fit_transform(np.vstack([COUNTS, np.zeros(5)]))
    np.testing.assert_allclose(out[:2].sum(axis=1), 1.0, atol=1e-15)
    np.testing.assert_array_equal(out[2], 0.0)  # an empty sample stays finite
    bad = COUNTS.copy()
    bad[0, 0] = -1.0
    with pytest.raises(ValueError, match="non-negative"):
        Closure().fit(bad)
    with pytest.raises(ValueError, match="non-negative"):
        Closure().fit(COUNTS).transform(bad)


def _prevalence_table() -> tuple[pd.DataFrame, pd.DataFrame]:
    """A: `rare` in 1 of 20 samples (prevalence 0.05); B: `rare` in every sample."""
    rng = np.random.default_rng(3)
    a = pd.DataFrame(rng.uniform(1, 10, size=(20, 3)), columns=["common", "rare", "half"])
    a.loc[1:, "rare"] = 0.0
    a.loc[::2, "half"] = 0.0
    b = pd.DataFrame(rng.uniform(1, 10, size=(6, 3)), columns=a.columns)
    return a, b


def test_prevalence_filter_learns_from_fit_data_only() -> None:
    """Support comes from the training rows; transform never re-estimates it."""
    a, b = _prevalence_table()
    fitted = PrevalenceFilter(min_prevalence=0.1, min_abundance=0.0).fit(a)
    np.testing.assert_allclose(fitted.prevalence_, [1.0, 0.05, 0.5])
    np.testing.assert_array_equal(fitted.get_support(), [True, False, True])
    np.testing.assert_array_equal(fitted.transform(b), b[["common", "half"]])
    refitted = PrevalenceFilter(min_prevalence=0.1, min_abundance=0.0).fit(pd.concat([a, b]))
    assert refitted.get_support().all()


def test_prevalence_filter_abundance_and_names_through_pipeline() -> None:
    """Names survive closure -> filter -> CLR, and the abundance floor applies to proportions."""
    a, _ = _prevalence_table()
    a["trace"] = 1e-3  # present everywhere, but ~1e-4 of the reads
    pipe = Pipeline([("closure", Closure()), ("filter", PrevalenceFilter(0.1, 1e-3)),
                     ("clr", CLR())]).fit(a)
    assert list(pipe.get_feature_names_out()) == ["common", "half"]
    assert pipe.transform(a).shape == (20, 2)


def test_prevalence_filter_that_keeps_nothing_raises() -> None:
    """An empty feature set must fail at fit with the thresholds in the message."""
    a, _ = _prevalence_table()
    with pytest.raises(ValueError, match=r"no taxon passes the filter \(prevalence >= 1.1"):
        PrevalenceFilter(min_prevalence=1.1).fit(a)


def test_clr_centres_rows_and_ignores_depth() -> None:
    """CLR rows sum to 0 and, after closure, do not depend on sequencing depth."""
    pipe = Pipeline([("closure", Closure()), ("clr", CLR())])
    out = pipe.fit_transform(COUNTS)
    np.testing.assert_allclose(out.sum(axis=1), 0.0, atol=1e-12)
    assert np.isfinite(out).all()  # zeros get the pseudocount
    np.testing.assert_allclose(pipe.transform(COUNTS * 10), out, rtol=0, atol=1e-12)
    positive = COUNTS[:1, :4]
    np.testing.assert_allclose(CLR(pseudocount=0.0).fit_transform(positive * 37.5),
                               CLR(pseudocount=0.0).fit_transform(positive), atol=1e-12)


def test_alpha_diversity_hand_example() -> None:
    """Shannon is scipy's natural-log entropy; richness counts taxa at or above detection."""
    out = AlphaDiversity(detection=0.2).fit_transform(np.vstack([COUNTS, np.zeros(5)]))
    assert out[0, 0] == pytest.approx(entropy([0.1, 0.2, 0.3, 0.4]), abs=1e-12)
    assert out[0, 1] == 3.0  # 0.1 is below detection, 0.2 counts
    assert out[1, 0] == pytest.approx(entropy([0.05, 0.95]), abs=1e-12)
    assert out[1, 1] == 1.0
    assert math.isnan(out[2, 0]) and out[2, 1] == 0.0
    assert AlphaDiversity(detection=0.0).fit_transform(COUNTS)[0, 1] == 5.0
    assert list(AlphaDiversity().get_feature_names_out()) == ["shannon_diversity",
                                                              "observed_genera"]


# --------------------------------------------------------------------------- ClinicalEncoder


def _clinical(**columns: list[object]) -> pd.DataFrame:
    n = len(next(iter(columns.values())))
    base: dict[str, list[object]] = {"treatment": ["ivig"] * n,
                                     "baseline_platelets": [10.0] * n}
    clinical = pd.DataFrame({**base, **columns}, index=sample_index(n))
    return model_input(clinical, pd.DataFrame({FAECALI: [1.0] * n}, index=clinical.index))


def _encode(encoder: ClinicalEncoder, X: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame(encoder.transform(X), columns=encoder.get_feature_names_out(),
                        index=X.index)


def test_encoder_treatments_from_fit_only() -> None:
    """One-hot columns exist only for treatments seen in training; others are refused."""
    X = _clinical(treatment=["ivig", "corticosteroid", "ivig"])
    encoder = ClinicalEncoder().fit(X)
    out = _encode(encoder, X)
    treatment_columns = [c for c in out.columns if c.startswith("treatment=")]
    assert treatment_columns == ["treatment=corticosteroid", "treatment=ivig"]
    assert out["treatment=ivig"].tolist() == [1.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="tpo_ra"):
        encoder.transform(_clinical(treatment=["ivig", "tpo_ra"]))


@pytest.mark.parametrize(
    ("months", "phase"),
    [(0.0, "newly_diagnosed"), (2.99, "newly_diagnosed"), (3.0, "persistent"),
     (11.99, "persistent"), (12.01, "chronic"), (240.0, "chronic")],
)
def test_encoder_phase(months: float, phase: str) -> None:
    """Phase one-hot: newly diagnosed < 3 months <= persistent; chronic beyond 12."""
    X = _clinical(months_since_diagnosis=[months])
    out = _encode(ClinicalEncoder().fit(X), X).iloc[0]
    phases = out[[c for c in out.index if c.startswith("phase=")]]
    assert phases.to_dict() == {f"phase={p}": float(p == phase)
                                for p in ("newly_diagnosed", "persistent", "chronic")}


def test_encoder_phase_at_exactly_twelve_months_is_one_phase() -> None:
    """Whatever the boundary, 12 months must fall into exactly one phase."""
    X = _clinical(months_since_diagnosis=[12.0])
    out = _encode(ClinicalEncoder().fit(X), X).iloc[0]
    assert out[[c for c in out.index if c.startswith("phase=")]].sum() == 1.0


def test_encoder_phase_at_exactly_twelve_months_is_persistent() -> None:
    """The documented (IWG) contract: chronic means more than 12 months."""
    X = _clinical(months_since_diagnosis=[12.0])
    out = _encode(ClinicalEncoder().fit(X), X).iloc[0]
    assert out["phase=persistent"] == 1.0
    assert out["phase=chronic"] == 0.0


def test_encoder_missing_stays_missing() -> None:
    """Missing months, sex, age and booleans stay NaN so the estimator decides."""
    X = _clinical(months_since_diagnosis=[np.nan, 5.0], sex=[None, "male"],
                  age_years=[np.nan, 40.0], h_pylori=[np.nan, 1.0])
    out = _encode(ClinicalEncoder().fit(X), X)
    missing = ["phase=newly_diagnosed", "phase=persistent", "phase=chronic", "sex=male",
               "age_years", "h_pylori", "bleeding_severity", "ipf_pct"]
    assert out.loc["S0", missing].isna().all()
    assert out.loc["S1", ["phase=persistent", "sex=male", "h_pylori"]].tolist() == [1.0] * 3
    assert out.loc["S1", "age_years"] == 40.0


def test_encoder_bleeding_severity_across_scales() -> None:
    """Scores on WHO, Buchanan and ITP-BAT become one fraction-of-maximum severity."""
    rows = [("2", "WHO", 0.5), ("4", "WHO", 1.0), ("1", "Buchanan", 0.2),
            ("5", "Buchanan", 1.0), ("S2M1O0", "ITP-BAT", 0.5), ("s1m3o0", "ITP-BAT", 0.75),
            ("S0M0O5", "ITP-BAT", 1.0), (None, None, math.nan)]
    X = _clinical(bleeding_score=[r[0] for r in rows], bleeding_scale=[r[1] for r in rows])
    out = _encode(ClinicalEncoder().fit(X), X)["bleeding_severity"]
    np.testing.assert_allclose(out, [r[2] for r in rows], rtol=0, atol=1e-15)


def test_encoder_training_ranges_come_from_fit() -> None:
    """Ranges flag extrapolation, so they must describe the training data only."""
    train = _clinical(baseline_platelets=[5.0, 25.0, 12.0], age_years=[30.0, np.nan, 70.0])
    encoder = ClinicalEncoder().fit(train)
    assert encoder.training_ranges_["baseline_platelets"] == [5.0, 25.0]
    assert encoder.training_ranges_["age_years"] == [30.0, 70.0]
    assert "ipf_pct" not in encoder.training_ranges_  # never measured: no range
    encoder.transform(_clinical(baseline_platelets=[500.0], age_years=[99.0]))
    assert encoder.training_ranges_["baseline_platelets"] == [5.0, 25.0]


# ------------------------------------------------------------- full pipelines: leakage, sklearn


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_transform_has_no_cross_row_state(name: str) -> None:
    """Scoring a row alone or in a batch gives the same features and probability."""
    X = raw_frame(40, seed=11)
    y = np.arange(40) % 2
    train, test = X.iloc[:30], X.iloc[30:]
    pipe = FAMILIES[name].build(FeatureConfig(), 0).fit(train, y[:30])
    batch = pipe[:-1].transform(test)
    proba = pipe.predict_proba(test)[:, 1]
    for i in (0, 4, 9):
        # equal up to float summation order (vectorised row means), not cross-row state
        np.testing.assert_allclose(pipe[:-1].transform(test.iloc[[i]])[0], batch[i],
                                   rtol=0, atol=1e-12)
        assert pipe.predict_proba(test.iloc[[i]])[0, 1] == pytest.approx(proba[i], abs=1e-12)
    reordered = pipe[:-1].transform(pd.concat([test.iloc[5:], train.iloc[:3], test.iloc[:5]]))
    np.testing.assert_allclose(reordered[:5], batch[5:], rtol=0, atol=1e-12)


def test_filter_support_is_learned_from_training_rows() -> None:
    """Refitting on more rows changes the taxa kept: the support is a fitted quantity."""
    rare = "d__Bacteria;p__Proteobacteria;c__Gammaproteobacteria;o__O;f__F;g__Rare"
    taxa = (*GENERA, rare)
    counts = counts_frame(40, seed=5, taxa=taxa)
    counts[rare] = 0.0
    counts.iloc[0, -1] = 500.0  # training rows A: present in 1 of 30 (< 10%)
    counts.iloc[30:, -1] = 500.0  # rows B: present in every sample
    X = model_input(clinical_frame(counts.index, seed=6), counts)
    y = np.arange(40) % 2
    build = FAMILIES["linear"].build
    on_a = build(FeatureConfig(), 0).fit(X.iloc[:30], y[:30])
    on_ab = build(FeatureConfig(), 0).fit(X, y)
    assert rare in on_a.named_steps["align"].vocabulary_
    assert rare not in on_a[:-1].get_feature_names_out()
    assert rare in on_ab[:-1].get_feature_names_out()
    taxa_a = on_a.named_steps["features"].named_transformers_["taxa"]
    assert taxa_a.named_steps["filter"].prevalence_[-1] == pytest.approx(1 / 30)
    scored = on_a[:-1].transform(X.iloc[30:])  # B scored with A's support
    assert scored.shape[1] == len(on_a[:-1].get_feature_names_out())


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_candidates_follow_sklearn_conventions(name: str) -> None:
    """clone() and get/set_params round-trip, which CV and grid tools rely on."""
    pipe = FAMILIES[name].build(FeatureConfig(), 0)
    plain = (bool, int, float, str, type(None))

    def scalars(p: Pipeline) -> dict[str, object]:
        return {k: v for k, v in p.get_params().items()
                if isinstance(v, plain) and not (isinstance(v, float) and math.isnan(v))}

    copy = clone(pipe)
    assert copy is not pipe and scalars(copy) == scalars(pipe)
    pipe.set_params(align__rank="family", features__taxa__filter__min_prevalence=0.25)
    assert pipe.named_steps["align"].rank == "family"
    filt = pipe.named_steps["features"].transformers[0][1].named_steps["filter"]
    assert filt.min_prevalence == 0.25
    assert clone(pipe).get_params()["features__taxa__filter__min_prevalence"] == 0.25
    fresh = clone(pipe).set_params(**scalars(pipe))
    assert scalars(fresh) == scalars(pipe)
    fitted = FAMILIES[name].build(FeatureConfig(), 0).fit(raw_frame(30, seed=2),
                                                            np.arange(30) % 2)
    with pytest.raises(NotFittedError):
        check_is_fitted(clone(fitted))
