"""Taxonomy harmonisation: one profile written by four pipelines lands on the same features."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from training.features import TaxonomyAligner
from training.taxonomy import is_unassigned, lineage_at_rank, parse_lineage, taxon_key

# The same five taxa (and one read unclassified at genus) as four references spell them.
SPELLINGS: dict[str, list[str]] = {
    "silva138": [
        "d__Bacteria;p__Firmicutes;c__Clostridia;o__Lachnospirales;f__Lachnospiraceae;"
        "g__Blautia;s__Blautia_wexlerae",
        "d__Bacteria;p__Bacteroidota;c__Bacteroidia;o__Bacteroidales;f__Bacteroidaceae;"
        "g__Bacteroides;s__Bacteroides_uniformis",
        "d__Bacteria;p__Firmicutes;c__Clostridia;o__Oscillospirales;f__Ruminococcaceae;"
        "g__Faecalibacterium;s__Faecalibacterium_prausnitzii",
        "d__Bacteria;p__Actinobacteriota;c__Actinobacteria;o__Bifidobacteriales;"
        "f__Bifidobacteriaceae;g__Bifidobacterium;s__Bifidobacterium_longum",
        "d__Bacteria;p__Proteobacteria;c__Gammaproteobacteria;o__Enterobacterales;"
        "f__Enterobacteriaceae;g__Escherichia;s__Escherichia_coli",
        "d__Bacteria;p__Firmicutes;c__Clostridia;o__Lachnospirales;f__Lachnospiraceae;"
        "g__uncultured;s__uncultured_bacterium",
    ],
    "silva132": [
        "D_0__Bacteria;D_1__Firmicutes;D_2__Clostridia;D_3__Clostridiales;"
        "D_4__Lachnospiraceae;D_5__Blautia;D_6__Blautia wexlerae",
        "D_0__Bacteria;D_1__Bacteroidetes;D_2__Bacteroidia;D_3__Bacteroidales;"
        "D_4__Bacteroidaceae;D_5__Bacteroides;D_6__Bacteroides uniformis",
        "D_0__Bacteria;D_1__Firmicutes;D_2__Clostridia;D_3__Clostridiales;"
        "D_4__Ruminococcaceae;D_5__Faecalibacterium;D_6__Faecalibacterium prausnitzii",
        "D_0__Bacteria;D_1__Actinobacteria;D_2__Actinobacteria;D_3__Bifidobacteriales;"
        "D_4__Bifidobacteriaceae;D_5__Bifidobacterium;D_6__Bifidobacterium longum",
        "D_0__Bacteria;D_1__Proteobacteria;D_2__Gammaproteobacteria;D_3__Enterobacteriales;"
        "D_4__Enterobacteriaceae;D_5__Escherichia-Shigella;D_6__Escherichia coli",
        "D_0__Bacteria;D_1__Firmicutes;D_2__Clostridia;D_3__Clostridiales;"
        "D_4__Lachnospiraceae;D_5__uncultured",
    ],
    "gtdb": [
        "d__Bacteria; p__Firmicutes_A; c__Clostridia; o__Lachnospirales; f__Lachnospiraceae; "
        "g__Blautia_A; s__Blautia_A wexlerae",
        "d__Bacteria; p__Bacteroidota; c__Bacteroidia; o__Bacteroidales; f__Bacteroidaceae; "
        "g__Bacteroides; s__Bacteroides uniformis",
        "d__Bacteria; p__Firmicutes_A; c__Clostridia; o__Oscillospirales; "
        "f__Ruminococcaceae; g__Faecalibacterium; s__Faecalibacterium prausnitzii",
        "d__Bacteria; p__Actinomycetota; c__Actinomycetes; o__Actinomycetales; "
        "f__Bifidobacteriaceae; g__Bifidobacterium; s__Bifidobacterium longum",
        "d__Bacteria; p__Pseudomonadota; c__Gammaproteobacteria; o__Enterobacterales; "
        "f__Enterobacteriaceae; g__Escherichia; s__Escherichia coli",
        "d__Bacteria; p__Firmicutes_A; c__Clostridia; o__Lachnospirales; f__Lachnospiraceae; "
        "g__; s__",
    ],
    "metaphlan": [
        "k__Bacteria|p__Firmicutes|c__Clostridia|o__Clostridiales|f__Lachnospiraceae|"
        "g__Blautia|s__Blautia_wexlerae",
        "k__Bacteria|p__Bacteroidetes|c__Bacteroidia|o__Bacteroidales|f__Bacteroidaceae|"
        "g__Bacteroides|s__Bacteroides_uniformis",
        "k__Bacteria|p__Firmicutes|c__Clostridia|o__Clostridiales|f__Ruminococcaceae|"
        "g__Faecalibacterium|s__Faecalibacterium_prausnitzii",
        "k__Bacteria|p__Actinobacteria|c__Actinobacteria|o__Bifidobacteriales|"
        "f__Bifidobacteriaceae|g__Bifidobacterium|s__Bifidobacterium_longum",
        "k__Bacteria|p__Proteobacteria|c__Gammaproteobacteria|o__Enterobacterales|"
        "f__Enterobacteriaceae|g__Escherichia|s__Escherichia_coli",
        "k__Bacteria|p__Firmicutes|c__Clostridia|o__Clostridiales|f__Lachnospiraceae|"
        "g__Lachnospiraceae_unclassified",
    ],
}
# SILVA 132 names the E. coli genus "Escherichia-Shigella"; the synonym table maps it.
READS = np.array([[120, 300, 80, 40, 10, 50], [10, 500, 5, 0, 200, 30], [60, 60, 60, 60, 60, 0]],
                 dtype=float)


def _profile(scheme: str) -> pd.DataFrame:
    return pd.DataFrame(READS, columns=SPELLINGS[scheme], index=["a", "b", "c"])


@pytest.mark.parametrize(("rank", "n_features"), [("genus", 6), ("species", 6), ("both", 11)])
def test_one_profile_written_four_ways_gives_the_same_features(rank: str, n_features: int
                                                               ) -> None:
    """An aligner fitted on SILVA 138 names scores SILVA 132, GTDB and MetaPhlAn spellings of
    the same profile to identical features, with every read matched."""
    aligner = TaxonomyAligner(rank).fit(_profile("silva138"))
    reference = aligner.transform(_profile("silva138"))
    assert reference.shape == (3, n_features)
    for scheme in ("silva132", "gtdb", "metaphlan"):
        scored = aligner.transform(_profile(scheme))
        pd.testing.assert_frame_equal(scored, reference, check_names=False, obj=scheme)
        assert aligner.matched_share(_profile(scheme)).eq(1.0).all(), scheme
        assert aligner.unknown_taxa(dict(zip(SPELLINGS[scheme], READS[0], strict=True))) == {}


def test_a_genus_the_model_never_saw_is_reported_with_its_share() -> None:
    aligner = TaxonomyAligner().fit(_profile("silva138"))
    other = "d__Bacteria;p__Firmicutes;c__Bacilli;o__Lactobacillales;f__Lactobacillaceae;" \
            "g__Lactobacillus"
    profile = {SPELLINGS["gtdb"][0]: 75.0, other: 25.0}
    assert aligner.unknown_taxa(profile) == {lineage_at_rank(other): 0.25}
    frame = pd.DataFrame([profile])
    assert aligner.matched_share(frame).iloc[0] == pytest.approx(0.75)


def test_canonical_names() -> None:
    """Prefixes, GTDB suffixes, renamed phyla, brackets and placeholders are harmonised."""
    assert taxon_key("D_0__Bacteria;D_1__Firmicutes;D_5__[Ruminococcus] torques group") == \
        "g__Ruminococcus_torques_group"
    assert lineage_at_rank("k__Bacteria|p__Bacillota", "phylum") == "d__Bacteria;p__Firmicutes"
    assert taxon_key("d__Bacteria;p__Firmicutes_A;g__Blautia_A;s__Blautia_A obeum",
                     "species") == "s__Blautia_obeum"
    assert parse_lineage("d__Bacteria;p__Firmicutes;g__uncultured;s__gut metagenome") == (
        ("domain", "Bacteria"), ("phylum", "Firmicutes"))
    # Species keys stop at the genus when the species is unnamed; strains never survive.
    assert taxon_key("k__Bacteria|g__Blautia|s__Blautia_obeum|t__SGB4810", "species") == \
        "s__Blautia_obeum"
    assert taxon_key("k__Bacteria|g__Blautia", "species") == "g__Blautia"
    # GTDB's split of a genus maps onto the undivided genus; roman numerals are other taxa
    assert taxon_key("d__Bacteria;g__Ruminococcus_B") == "g__Ruminococcus"
    assert taxon_key("d__Bacteria;g__Clostridium_IV") == "g__Clostridium_IV"
    assert taxon_key("d__Bacteria;f__Family_XI", "family") == "f__Family_XI"
    # an epithet alone (Greengenes) is named by its genus, so two genera's hominis differ
    assert taxon_key("k__Bacteria;g__Staphylococcus;s__hominis", "species") == \
        "s__Staphylococcus_hominis"
    assert taxon_key("k__Bacteria;g__Blautia;s__hominis", "species") == "s__Blautia_hominis"


@pytest.mark.parametrize("taxon", ["", "Unassigned", "unclassified", "UNCLASSIFIED",
                                   "d__Unassigned", "k__;p__;c__", "D_0__unidentified",
                                   "Unassigned;__;__;__;__;__;__", "UNKNOWN"])
def test_reads_without_a_taxon_are_recognised(taxon: str) -> None:
    assert is_unassigned(taxon)


@pytest.mark.parametrize("taxon", ["d__Bacteria", "k__Bacteria|p__Firmicutes", "ASV_0001"])
def test_named_lineages_and_plain_ids_are_not_unassigned(taxon: str) -> None:
    assert not is_unassigned(taxon)
