"""Every supported profile format, built here from one simulated cohort, trains and predicts
the same as the plain lineage table: same samples, same proportions, same features.

Formats (docs/data-format.md): lineage TSV, ASV ids + taxonomy.tsv, a `taxonomy` column in
the table, QIIME 2 artifacts (.qza), and a MetaPhlAn merged profile (every rank, in %).
"""

from __future__ import annotations

import hashlib
import io
import re
import zipfile
from collections.abc import Callable
from pathlib import Path

import biom
import h5py
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from training.cli import main
from training.cohort import CohortError, depth_report, load_cohort
from training.features import model_input
from training.outcomes import response_labels, target
from training.profiles import read_profiles
from training.simulate import SCENARIOS, simulate, write_cohort
from training.taxonomy import taxon_key
from training.tuning import ModelSearch

UNASSIGNED_READS = 37  # per sample, under an empty id / "Unassigned" / UNCLASSIFIED


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """A simulated cohort as the plain lineage table, and a model fitted on it."""
    directory = tmp_path_factory.mktemp("reference")
    cohort = simulate(120, 11, SCENARIOS["default"])
    write_cohort(cohort, directory)
    loaded = load_cohort(directory)
    X = model_input(loaded.metadata, loaded.counts)
    y = target(response_labels(loaded.metadata)).to_numpy()
    search = ModelSearch(ranks=("genus",), seed=3).fit(X, y, groups=loaded.groups.to_numpy())
    return {"dir": directory, "table": cohort.feature_table, "cohort": loaded, "X": X, "y": y,
            "search": search}


def _asvs(table: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, str]]:
    """Each lineage split into two ASVs with hash ids, plus one unassigned ASV."""
    rows, taxonomy = {}, {}
    for lineage, reads in table.iterrows():
        first = (reads // 2).astype(float)
        for part, values in enumerate((first, reads - first)):
            asv = hashlib.md5(f"{lineage}{part}".encode()).hexdigest()
            rows[asv], taxonomy[asv] = values, lineage
    unassigned = hashlib.md5(b"unassigned").hexdigest()
    rows[unassigned] = pd.Series(float(UNASSIGNED_READS), index=table.columns)
    taxonomy[unassigned] = "Unassigned"
    return pd.DataFrame(rows).T, taxonomy


def _taxonomy_tsv(taxonomy: dict[str, str]) -> str:
    lines = ["Feature ID\tTaxon\tConfidence"]
    lines += [f"{asv}\t{taxon.replace(';', '; ')}\t0.98" for asv, taxon in taxonomy.items()]
    return "\n".join(lines) + "\n"


def _table_tsv(table: pd.DataFrame, extra: pd.Series | None = None) -> str:
    frame = table if extra is None else table.assign(taxonomy=extra)
    body = frame.to_csv(sep="\t", header=False, lineterminator="\n")
    return "# Constructed from biom file\n" + "\t".join(["#OTU ID", *frame.columns]) + "\n" + body


def _qza(kind: str, member: str, data: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        root = "6f1a2b3c-0000-4000-8000-000000000000"
        archive.writestr(f"{root}/metadata.yaml",
                         f"uuid: {root}\ntype: {kind}\nformat: BIOMV210DirFmt\n")
        archive.writestr(f"{root}/data/{member}", data)
    return buffer.getvalue()


def _hdf5_biom(table: pd.DataFrame) -> bytes:
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as handle:
        biom.Table(table.to_numpy(), list(table.index), list(table.columns)).to_hdf5(
            handle, "test")
    return buffer.getvalue()


def _metaphlan(table: pd.DataFrame) -> str:
    """merge_metaphlan_tables.py output: every rank, % of all reads, UNCLASSIFIED first."""
    total = table.sum(axis=0) + UNASSIGNED_READS
    rows: dict[str, pd.Series] = {"UNCLASSIFIED": 100 * UNASSIGNED_READS / total}
    for lineage, reads in table.iterrows():
        parts = lineage.replace("d__", "k__", 1).split(";")
        for depth in range(1, len(parts) + 1):
            clade = "|".join(parts[:depth])
            rows[clade] = rows.get(clade, 0.0) + 100 * reads / total
    frame = pd.DataFrame(rows).T.round(5)
    body = frame.to_csv(sep="\t", header=False, lineterminator="\n")
    header = "\t".join(["clade_name", *frame.columns])
    return f"#mpa_vJan21_CHOCOPhlAnSGB_202103\n{header}\n{body}"


def _species(counts: pd.DataFrame) -> pd.DataFrame:
    """Proportions per sample, summed per harmonised species key, in a fixed column order."""
    keyed = counts.T.groupby(counts.columns.map(lambda c: taxon_key(c, "species"))).sum().T
    return keyed.div(keyed.sum(axis=1), axis=0).sort_index(axis=1)


def _write(directory: Path, files: dict[str, str | bytes]) -> None:
    for name, content in files.items():
        path = directory / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)


def _formats(table: pd.DataFrame) -> dict[str, Callable[[], dict[str, str | bytes]]]:
    asvs, taxonomy = _asvs(table)
    return {
        "asv+taxonomy.tsv": lambda: {"feature-table.tsv": _table_tsv(asvs),
                                     "taxonomy.tsv": _taxonomy_tsv(taxonomy)},
        "taxonomy column": lambda: {"feature-table.tsv": _table_tsv(
            asvs, pd.Series(taxonomy).reindex(asvs.index))},
        "qiime2 qza": lambda: {
            "feature-table.qza": _qza("FeatureTable[Frequency]", "feature-table.biom",
                                      _hdf5_biom(asvs)),
            "taxonomy.qza": _qza("FeatureData[Taxonomy]", "taxonomy.tsv",
                                 _taxonomy_tsv(taxonomy).encode())},
        "metaphlan": lambda: {"feature-table.tsv": _metaphlan(table)},
    }


@pytest.mark.parametrize("fmt", ["asv+taxonomy.tsv", "taxonomy column", "qiime2 qza",
                                 "metaphlan"])
def test_each_format_trains_and_predicts_like_the_lineage_table(
        reference: dict[str, object], tmp_path: Path, fmt: str) -> None:
    """Same proportions per sample, the reference model scores it identically, and a model
    trained on it predicts what the reference model predicts; unassigned reads are counted
    and left out, MetaPhlAn's rank rows are not summed into their sub-ranks.

    MetaPhlAn writes percentages to 5 decimals, so its proportions differ from the counts'
    by up to 1e-7. The stacked forest's split points are values of its training table: a
    training sample on a split point crosses it when rounded, so the reference model scores
    the rounded table only approximately. A model trained on the rounded table itself splits
    at rounded values, and predicts what the reference predicts."""
    table: pd.DataFrame = reference["table"]
    directory = tmp_path / "cohort"
    directory.mkdir()
    (directory / "metadata.tsv").write_bytes((reference["dir"] / "metadata.tsv").read_bytes())
    _write(directory, _formats(table)[fmt]())
    cohort = load_cohort(directory)
    pd.testing.assert_frame_equal(_species(cohort.counts), _species(reference["cohort"].counts),
                                  check_exact=False, atol=1e-6, check_names=False)
    assert cohort.unassigned_share.gt(0).all()
    assert cohort.abundance == ("relative" if fmt == "metaphlan" else "counts")
    X = model_input(cohort.metadata, cohort.counts)
    y = target(response_labels(cohort.metadata)).to_numpy()
    search: ModelSearch = reference["search"]
    expected_p = search.predict_proba(reference["X"])[:, 1]
    rounded = fmt == "metaphlan"
    if not rounded:
        np.testing.assert_allclose(search.predict_proba(X)[:, 1], expected_p, atol=1e-6)
    refit = ModelSearch(ranks=("genus",), seed=3).fit(X, y, groups=cohort.groups.to_numpy())
    np.testing.assert_allclose(refit.predict_proba(X)[:, 1], expected_p,
                               atol=1e-3 if rounded else 1e-4)


def test_taxonomy_must_cover_every_feature(reference: dict[str, object], tmp_path: Path
                                           ) -> None:
    asvs, taxonomy = _asvs(reference["table"])
    missing = next(iter(taxonomy))
    del taxonomy[missing]
    directory = tmp_path / "cohort"
    directory.mkdir()
    (directory / "metadata.tsv").write_bytes((reference["dir"] / "metadata.tsv").read_bytes())
    _write(directory, {"feature-table.tsv": _table_tsv(asvs),
                       "taxonomy.tsv": _taxonomy_tsv(taxonomy)})
    with pytest.raises(CohortError, match=f"taxonomy.tsv: no taxon for 1 feature id.*{missing}"):
        load_cohort(directory)


def test_a_qza_of_the_wrong_type_is_named(tmp_path: Path, reference: dict[str, object]
                                          ) -> None:
    directory = tmp_path / "cohort"
    directory.mkdir()
    (directory / "metadata.tsv").write_bytes((reference["dir"] / "metadata.tsv").read_bytes())
    (directory / "feature-table.qza").write_bytes(
        _qza("FeatureData[Sequence]", "dna-sequences.fasta", b">a\nACGT\n"))
    with pytest.raises(CohortError, match=r"feature-table.qza: .*'FeatureData\[Sequence\]'.*"
                                          r"FeatureTable\[Frequency\]"):
        load_cohort(directory)


def test_a_shallow_16s_cohort_is_reported_with_the_option_that_keeps_it(
        reference: dict[str, object], tmp_path: Path) -> None:
    """Most samples under --min-reads: validate says how many went, why, and what to pass."""
    table: pd.DataFrame = reference["table"]
    shallow = (table / table.sum(axis=0) * 250).round()
    shallow.iloc[:, :10] = (table.iloc[:, :10] / table.iloc[:, :10].sum(axis=0) * 5000).round()
    directory = tmp_path / "cohort"
    directory.mkdir()
    (directory / "metadata.tsv").write_bytes((reference["dir"] / "metadata.tsv").read_bytes())
    _write(directory, {"feature-table.tsv": _table_tsv(shallow)})
    cohort = load_cohort(directory)
    report = "\n".join(depth_report(cohort))
    n = table.shape[1]
    assert f"{n - 10} of {n} samples dropped below min_reads=1000" in report
    assert re.search(r"--min-reads 2\d\d to keep 90%", report), report  # ~250 reads each
    result = CliRunner().invoke(main, ["validate", "--data", str(directory)])
    assert result.exit_code == 0, result.output
    assert f"{n - 10} of {n} samples dropped" in result.output
    assert "--min-reads" in result.output


def test_metaphlan_keeps_only_the_deepest_clades(tmp_path: Path) -> None:
    """A genus row carrying more than its species (reads placed at genus only) is still a
    total: counting it as well would count those species twice."""
    path = tmp_path / "feature-table.tsv"
    path.write_text(
        "#mpa_vJan21_CHOCOPhlAnSGB_202103\nclade_name\ts1\ts2\n"
        "UNKNOWN\t10\t20\n"
        "k__Bacteria\t90\t80\n"
        "k__Bacteria|g__Blautia\t60\t50\n"
        "k__Bacteria|g__Blautia|s__Blautia_obeum\t30\t20\n"
        "k__Bacteria|g__Blautia|s__Blautia_wexlerae\t20\t20\n"
        "k__Bacteria|g__Bacteroides\t30\t30\n")
    profiles = read_profiles(path)
    assert profiles.rollups == 2
    assert list(profiles.counts.columns) == ["k__Bacteria|g__Blautia|s__Blautia_obeum",
                                             "k__Bacteria|g__Blautia|s__Blautia_wexlerae",
                                             "k__Bacteria|g__Bacteroides"]
    np.testing.assert_allclose(profiles.counts.sum(axis=1), [80, 70])
    np.testing.assert_allclose(profiles.unassigned, [10, 20])


def test_asv_reads_joined_to_their_taxonomy_are_never_taken_for_totals(tmp_path: Path
                                                                        ) -> None:
    """An ASV classified to a genus whose reads happen to equal those of ASVs classified to
    its species is a read of its own, not a rank total."""
    (tmp_path / "feature-table.tsv").write_text(
        "#OTU ID\ts1\ts2\nasv1\t5\t7\nasv2\t3\t4\nasv3\t2\t3\nasv4\t9\t0\n")
    (tmp_path / "taxonomy.tsv").write_text(
        "Feature ID\tTaxon\tConfidence\n"
        "asv1\td__Bacteria;g__Blautia\t0.9\n"
        "asv2\td__Bacteria;g__Blautia;s__Blautia_obeum\t0.9\n"
        "asv3\td__Bacteria;g__Blautia;s__Blautia_obeum\t0.9\n"
        "asv4\tUnassigned;__;__;__;__;__;__\t0.5\n")
    profiles = read_profiles(tmp_path / "feature-table.tsv", tmp_path / "taxonomy.tsv")
    assert profiles.rollups == 0
    np.testing.assert_allclose(profiles.counts.sum(axis=1), [10, 14])
    np.testing.assert_allclose(profiles.unassigned, [9, 0])
