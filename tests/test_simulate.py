"""The simulator must write the project's cohort format and a ground truth that holds."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from training import schema
from training import simulate as sim

GENUS_OF = ";s__"


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sim") / "demo"  # does not exist yet: write_cohort creates it
    sim.write_cohort(sim.simulate(400, 7, sim.SCENARIOS["default"]), out)
    return out


@pytest.fixture(scope="module")
def large() -> dict[str, sim.SimulatedCohort]:
    return {name: sim.simulate(2000, 3, scenario) for name, scenario in sim.SCENARIOS.items()}


def read_metadata(path: Path) -> pd.DataFrame:
    return pd.read_csv(path / "metadata.tsv", sep="\t", dtype=str, keep_default_na=False)


def read_table(path: Path) -> pd.DataFrame:
    return pd.read_csv(path / "feature-table.tsv", sep="\t", skiprows=1, index_col=0)


def genus_table(table: pd.DataFrame) -> pd.DataFrame:
    return table.groupby(table.index.str.rsplit(GENUS_OF, n=1).str[0]).sum()


def pairwise_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    pos, neg = scores[labels == 1], scores[labels == 0]
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0) + 0.5 * (diff == 0)).mean())


# --- determinism and file format -------------------------------------------------------------

def test_same_seed_gives_byte_identical_files(written: Path, tmp_path: Path) -> None:
    sim.write_cohort(sim.simulate(400, 7, sim.SCENARIOS["default"]), tmp_path / "again")
    sim.write_cohort(sim.simulate(400, 8, sim.SCENARIOS["default"]), tmp_path / "other")
    for name in sim.FILES:
        assert (tmp_path / "again" / name).read_bytes() == (written / name).read_bytes(), name
        assert (tmp_path / "other" / name).read_bytes() != (written / name).read_bytes(), name


def test_feature_table_has_biom_tsv_layout(written: Path) -> None:
    lines = (written / "feature-table.tsv").read_text(encoding="utf-8").splitlines()
    assert lines[0] == "# Constructed from biom file"
    header = lines[1].split("\t")
    assert header[0] == "#OTU ID"
    assert header[1:] == read_metadata(written)[schema.SAMPLE_ID].tolist()
    rows = np.array([line.split("\t") for line in lines[2:]])
    assert rows.shape[1] == len(header)
    assert np.char.isdigit(rows[:, 1:]).all()  # non-negative integers, no decimals
    ids = rows[:, 0]
    assert len(set(ids)) == len(ids)
    for taxon in ids:
        assert schema.is_taxon(taxon)
        assert [part.split("__", 1)[0] for part in taxon.split(";")] == list("dpcofgs")


def test_feature_table_is_species_level_with_real_key_species(written: Path) -> None:
    table = read_table(written)
    species = set(table.index.str.rsplit("s__", n=1).str[-1])
    for name in ("Bacteroides_ovatus", "Bacteroides_xylanisolvens", "Parabacteroides_gordonii",
                 "Faecalibacterium_prausnitzii", "Akkermansia_muciniphila"):
        assert name in species
    assert any(s.endswith("_sp2") for s in species)
    per_genus = table.index.str.rsplit(GENUS_OF, n=1).str[0].value_counts()
    assert per_genus.between(1, 3).all()
    assert (per_genus > 1).sum() >= 50  # aggregation to genus has work to do


def test_metadata_follows_the_schema(written: Path) -> None:
    meta = read_metadata(written)
    expected = [schema.SAMPLE_ID, schema.SUBJECT_ID, schema.TREATMENT,
                *(f.name for f in schema.CLINICAL_FIELDS), *sim.OUTCOME_COLUMNS]
    assert list(meta.columns) == [*expected, sim.BATCH]
    assert "response" not in meta.columns
    assert meta[schema.SAMPLE_ID].is_unique
    assert meta[schema.SAMPLE_ID].str.fullmatch(r"S\d{4}").all()
    assert meta[schema.SUBJECT_ID].str.fullmatch(r"P\d{4}").all()
    assert meta[schema.TREATMENT].isin(schema.TREATMENTS).all()
    for column in schema.REQUIRED_COLUMNS + sim.OUTCOME_COLUMNS:
        assert (meta[column] != "").all(), column
    for spec in schema.CLINICAL_FIELDS + schema.OUTCOME_FIELDS:
        if spec.name not in meta or spec.kind is schema.Kind.TEXT:
            continue
        cells = meta.loc[meta[spec.name] != "", spec.name]
        if spec.kind is schema.Kind.NUMBER:
            assert cells.astype(float).between(spec.minimum, spec.maximum).all(), spec.name
        elif spec.kind is schema.Kind.BOOLEAN:
            assert cells.isin([schema.YES, schema.NO]).all(), spec.name
        else:
            assert cells.isin(spec.categories).all(), spec.name


def test_bleeding_scores_parse_on_their_scale(written: Path) -> None:
    meta = read_metadata(written)
    severity = [schema.bleeding_severity(score, scale or None)
                for score, scale in zip(meta["bleeding_score"], meta["bleeding_scale"],
                                        strict=True)]
    assert np.isnan(severity).sum() == (meta["bleeding_score"] == "").sum()
    scales = meta.loc[meta["bleeding_scale"] != "", "bleeding_scale"].value_counts(normalize=True)
    assert 0.04 < scales["ITP-BAT"] < 0.2
    who = meta.loc[meta["bleeding_scale"] == "WHO", "bleeding_score"].astype(int)
    assert (who <= 1).mean() > 0.5  # skewed low


def test_some_values_are_missing_but_not_too_many(written: Path) -> None:
    meta = read_metadata(written)
    for marker in sim.IMMUNE_MARKERS:
        assert 0.05 < (meta[marker] == "").mean() < 0.2, marker
    assert (meta["tpo_pg_ml"] == "").any()
    assert (meta[["age_years", "sex", "months_since_diagnosis"]] != "").all().all()


# --- realism ---------------------------------------------------------------------------------

def test_genus_catalogue() -> None:
    genera = sim.load_genera()
    assert len(genera) >= 150
    assert genera["genus"].is_unique
    assert set(genera["role"]) == set(sim.ROLES)
    assert set(genera["enterotype"]) <= {"", *sim.ENTEROTYPES}
    for lineage in genera["lineage"]:
        assert [part.split("__", 1)[0] for part in lineage.split(";")] == list("dpcofg")
    lineage = dict(zip(genera["genus"], genera["lineage"], strict=True))
    for genus, family in [("Faecalibacterium", "f__Ruminococcaceae"),
                          ("Blautia", "f__Lachnospiraceae"), ("Bacteroides", "f__Bacteroidaceae"),
                          ("Prevotella_9", "f__Prevotellaceae"),
                          ("Akkermansia", "f__Akkermansiaceae"),
                          ("Escherichia-Shigella", "f__Enterobacteriaceae"),
                          ("Bifidobacterium", "f__Bifidobacteriaceae")]:
        assert f";{family};" in lineage[genus], genus
    role = dict(zip(genera["genus"], genera["role"], strict=True))
    assert role["Faecalibacterium"] == role["Roseburia"] == role["Bifidobacterium"] == "scfa"
    assert role["Escherichia-Shigella"] == role["[Ruminococcus]_gnavus_group"] == "inflammatory"
    assert genera["prevalence"].min() <= 0.15 and genera["prevalence"].max() >= 0.95


def test_sparsity_and_library_sizes(written: Path) -> None:
    table = read_table(written)
    genus = genus_table(table)
    genus_zeros = (genus.to_numpy() == 0).mean()
    assert 0.4 <= genus_zeros <= 0.7
    assert (table.to_numpy() == 0).mean() > genus_zeros
    depth = table.sum()
    assert depth.min() >= 10**3.5 - 1 and depth.max() <= 10**5 + 1
    assert depth.max() / depth.min() > 10  # spread over orders of magnitude


def test_patients_have_one_to_three_correlated_episodes(large: dict) -> None:
    meta = large["default"].metadata
    per_subject = meta[schema.SUBJECT_ID].value_counts().value_counts(normalize=True)
    np.testing.assert_allclose(per_subject.sort_index(), [0.75, 0.20, 0.05], atol=0.04)
    assert (meta.groupby(schema.SUBJECT_ID)["sex"].nunique() == 1).all()
    months = meta["months_since_diagnosis"].astype(float)
    assert (months.groupby(meta[schema.SUBJECT_ID]).diff().dropna() > 0).all()
    later = meta[schema.SUBJECT_ID].duplicated()
    second_line = meta[schema.TREATMENT].isin(["tpo_ra", "rituximab"])
    assert second_line[later].mean() > second_line[~later].mean() + 0.2
    eradication = meta[schema.TREATMENT] == "h_pylori_eradication"
    assert meta.loc[eradication, "h_pylori"].isin([schema.YES, ""]).all()


def test_same_subject_samples_are_more_alike(written: Path) -> None:
    meta, table = read_metadata(written), genus_table(read_table(written))
    profiles = np.log((table + 0.5) / table.sum()).T.to_numpy()
    profiles = profiles - profiles.mean(axis=1, keepdims=True)
    corr = np.corrcoef(profiles)
    subject = meta[schema.SUBJECT_ID].to_numpy()
    same = subject[:, None] == subject[None, :]
    off_diagonal = ~np.eye(len(subject), dtype=bool)
    assert corr[same & off_diagonal].mean() > corr[~same].mean() + 0.1


def test_clinical_covariates_match_the_domain(large: dict) -> None:
    meta = large["default"].metadata
    number = meta.replace("", np.nan)
    assert 45 < number["age_years"].astype(float).mean() < 55
    assert 0.55 < (meta["sex"] == "female").mean() < 0.65
    baseline = number["baseline_platelets"].astype(float)
    assert 12 <= baseline.median() <= 18 and (baseline < 30).mean() > 0.75
    assert 7 < number["ipf_pct"].astype(float).median() < 11
    assert 40 < number["tpo_pg_ml"].astype(float).median() < 60
    for column, rate in [("h_pylori", 0.2), ("antibiotics_3m", 0.15), ("anti_gpib", 0.3)]:
        cells = meta.loc[meta[column] != "", column]
        assert abs((cells == schema.YES).mean() - rate) < 0.04, column


def test_immune_markers_share_the_latent_state(large: dict) -> None:
    markers = large["default"].metadata[list(sim.IMMUNE_MARKERS)].replace("", np.nan)
    corr = markers.astype(float).corr(method="spearman")
    for tolerogenic in ("treg_pct", "il10_pg_ml", "tgfb1_ng_ml"):
        for inflammatory in ("ifng_pg_ml", "il17_pg_ml", "baff_pg_ml"):
            assert corr.loc[tolerogenic, inflammatory] < -0.1
    assert corr.loc["treg_pct", "tgfb1_ng_ml"] > 0.1


def test_antibiotics_deplete_scfa_producers(large: dict) -> None:
    cohort = large["default"]
    genera = sim.load_genera().set_index("lineage")["role"]
    table = genus_table(cohort.feature_table)
    share = table.groupby(genera.reindex(table.index).to_numpy()).sum() / table.sum()
    antibiotics = cohort.metadata["antibiotics_3m"].to_numpy()
    scfa = share.loc["scfa"].to_numpy()
    assert np.median(scfa[antibiotics == schema.YES]) < 0.8 * np.median(
        scfa[antibiotics == schema.NO])


# --- ground truth ----------------------------------------------------------------------------

def test_iwg_rule_on_written_columns_reproduces_truth(written: Path) -> None:
    meta = read_metadata(written)
    truth = pd.read_csv(written / "truth.tsv", sep="\t", dtype={"response": str})
    assert truth[schema.SAMPLE_ID].tolist() == meta[schema.SAMPLE_ID].tolist()
    platelets = meta["followup_platelets"].astype(float)
    baseline = meta["baseline_platelets"].astype(float)
    ok = (meta["followup_bleeding"] == schema.NO) & (meta["steroid_dependent"] == schema.NO)
    derived = np.select([ok & (platelets >= 100), ok & (platelets >= 30)
                         & (platelets >= 2 * baseline)], ["CR", "R"], "NR")
    assert (derived == truth["response"]).all()
    assert (truth["responded"] == (truth["response"] != "NR")).all()
    assert set(truth["response"]) == set(schema.RESPONSES)
    nr = truth["response"] == "NR"
    assert (nr & (platelets < 30)).any()
    assert (nr & ok & platelets.between(30, 99) & (platelets < 2 * baseline)).any()
    assert (nr & (meta["followup_bleeding"] == schema.YES) & (platelets >= 30)).any()
    dependent = meta["steroid_dependent"] == schema.YES
    assert dependent.any()
    assert (meta.loc[dependent, schema.TREATMENT] == "corticosteroid").all()


def test_followup_day_fits_the_treatment(written: Path) -> None:
    meta = read_metadata(written)
    day = meta["followup_day"].astype(int)
    for treatment, (lo, hi) in sim.SCENARIOS["default"].followup_days.items():
        assert day[meta[schema.TREATMENT] == treatment].between(lo, hi).all(), treatment
    assert day[meta[schema.TREATMENT] == "ivig"].max() <= 7


def test_marginal_response_rates_match_targets(large: dict) -> None:
    truth = large["default"].truth
    info = large["default"].info
    for treatment, target in sim.SCENARIOS["default"].response_rates.items():
        group = truth[truth[schema.TREATMENT] == treatment]
        assert group["true_probability"].mean() == pytest.approx(target, abs=1e-6)
        tolerance = 4 * np.sqrt(target * (1 - target) / len(group)) + 0.01
        assert abs(group["responded"].mean() - target) < tolerance, treatment
        assert info["realised_response_rates"][treatment] == pytest.approx(
            group["responded"].mean(), abs=1e-6)


def test_best_auroc_orders_the_scenarios(large: dict) -> None:
    best = {name: cohort.info["best_auroc"] for name, cohort in large.items()}
    assert best["null"] < 0.6
    assert 0.75 <= best["default"] <= 0.88
    assert best["strong"] > best["default"] + 0.05
    truth = large["default"].truth
    assert best["default"] == pytest.approx(
        pairwise_auroc(truth["responded"].to_numpy(), truth["true_probability"].to_numpy()),
        abs=1e-6)


def test_null_scenario_gives_every_episode_the_same_probability(large: dict) -> None:
    assert large["null"].truth["true_probability"].nunique() == 1
    no_signal = sim.simulate(300, 5, sim.get_scenario("default", signal=0.0))
    per_treatment = no_signal.truth.groupby(schema.TREATMENT)["true_probability"].nunique()
    assert (per_treatment == 1).all()
    assert all(c["beta"] == 0 for c in no_signal.info["coefficients"])


def test_coefficients_follow_the_domain_directions(written: Path) -> None:
    info = json.loads((written / "truth.json").read_text(encoding="utf-8"))
    everyone = sorted(schema.TREATMENTS)
    expected = {
        ("age_per_10y", ("corticosteroid",)): "down",
        ("bleeding_severity", ("corticosteroid",)): "down",
        ("log2_ipf", ("corticosteroid",)): "up",
        ("anti_gpib", ("ivig",)): "down",
        ("tpo_per_10", ("tpo_ra",)): "down",
        ("log2_months", ("tpo_ra",)): "down",
        ("std_log_treg_pct", tuple(everyone)): "up",
        ("std_log_tgfb1_ng_ml", tuple(everyone)): "up",
        ("std_log_il10_pg_ml", tuple(everyone)): "up",
        ("std_log_ifng_pg_ml", tuple(everyone)): "down",
        ("std_log_baff_pg_ml", tuple(everyone)): "down",
        ("std_log_il17_pg_ml", tuple(everyone)): "down",
        ("scfa_balance", tuple(everyone)): "up",
    }
    found = {(c["feature"], tuple(sorted(c["treatments"]))): c for c in info["coefficients"]}
    for key, direction in expected.items():
        coefficient = found[key]
        assert coefficient["direction"] == direction, key
        assert np.sign(coefficient["beta"]) == (1 if direction == "up" else -1), key
    strongest = max(info["coefficients"], key=lambda c: abs(c["beta"]))
    assert strongest["name"] == "anti_gpib:ivig"
    assert set(info["intercepts"]) == set(schema.TREATMENTS)
    assert info["seed"] == 7 and info["scenario"]["name"] == "default"


def test_anti_gpib_lowers_ivig_response_in_the_data(large: dict) -> None:
    cohort = large["default"]
    ivig = cohort.metadata[schema.TREATMENT] == "ivig"
    gpib = cohort.metadata.loc[ivig, "anti_gpib"]
    responded = cohort.truth.loc[ivig, "responded"]
    assert responded[gpib == schema.YES].mean() < responded[gpib == schema.NO].mean() - 0.2


def test_signal_scales_the_coefficients() -> None:
    default = sim.SCENARIOS["default"]
    strong = replace(default, signal=2.0)
    a = sim.simulate(50, 1, default).info["coefficients"]
    b = sim.simulate(50, 1, strong).info["coefficients"]
    assert [2 * c["beta"] for c in a] == pytest.approx([c["beta"] for c in b])


def test_bad_arguments_are_rejected() -> None:
    with pytest.raises(ValueError, match="n_patients"):
        sim.simulate(0, 1, sim.SCENARIOS["default"])
    with pytest.raises(ValueError, match="unknown scenario"):
        sim.get_scenario("nope")
    assert sim.get_scenario("strong", signal=0.5).signal == 0.5
