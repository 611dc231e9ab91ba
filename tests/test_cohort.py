"""Cohort loading: typing, alignment, low-depth handling and every validation message."""

from __future__ import annotations

import json
from pathlib import Path

import biom
import h5py
import numpy as np
import pandas as pd
import pytest

from training import schema
from training.cohort import (
    Cohort,
    CohortError,
    load_cohort,
    read_metadata,
)
from training.outcomes import response_labels
from training.profiles import read_feature_table

DOCS = Path(__file__).resolve().parents[1] / "docs" / "data-format.md"
TAXA = ("d__Bacteria;p__Firmicutes;g__Blautia", "d__Bacteria;p__Bacteroidota;g__Bacteroides",
        "d__Bacteria;p__Firmicutes;g__Faecalibacterium")
COUNTS = {"S1": (1200, 300, 0), "S2": (40, 2500, 700), "S3": (10, 5, 2000)}
METADATA = [
    [schema.SAMPLE_ID, schema.SUBJECT_ID, schema.TREATMENT, "baseline_platelets",
     "followup_platelets", "followup_bleeding"],
    ["S1", "P1", "corticosteroid", "12", "80", "no"],
    ["S2", "P1", "tpo_ra", "20", "15", "no"],
    ["S3", "P2", "ivig", "8", "120", "no"],
]


def tsv(rows: list[list[str]]) -> str:
    return "".join("\t".join(row) + "\n" for row in rows)


def table_text(counts: dict[str, tuple[float, ...]] = COUNTS, taxa: tuple[str, ...] = TAXA,
               preamble: bool = True) -> str:
    rows = [["#OTU ID", *counts]]
    rows += [[taxon, *(str(v[i]) for v in counts.values())] for i, taxon in enumerate(taxa)]
    return ("# Constructed from biom file\n" if preamble else "") + tsv(rows)


def write(directory: Path, metadata: str | list[list[str]] | None = None,
          table: str | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    text = tsv(METADATA) if metadata is None else metadata
    (directory / "metadata.tsv").write_text(text if isinstance(text, str) else tsv(text))
    (directory / "feature-table.tsv").write_text(table_text() if table is None else table)
    return directory


def with_column(name: str, values: list[str], rows: list[list[str]] = METADATA
                ) -> list[list[str]]:
    return [[*row, cell] for row, cell in zip(rows, [name, *values], strict=True)]


def set_cell(row: int, column: str, value: str, rows: list[list[str]] = METADATA
             ) -> list[list[str]]:
    copy = [list(r) for r in rows]
    copy[row][copy[0].index(column)] = value
    return copy


# ----------------------------------------------------------------------------- loading


def test_loads_and_types(tmp_path: Path) -> None:
    rows = with_column("sex", ["Female", "male", ""])
    rows = with_column("h_pylori", ["YES", "no", ""], rows)
    rows = with_column("bleeding_score", ["S2M1O0", "2", ""], rows)
    rows = with_column("bleeding_scale", ["ITP-BAT", "who", ""], rows)
    rows = with_column("site", ["Rome", "", "Lyon"], rows)
    cohort = load_cohort(write(tmp_path, rows))
    meta = cohort.metadata

    assert isinstance(cohort, Cohort)
    assert meta.index.name == schema.SAMPLE_ID
    assert meta.index.tolist() == ["S1", "S2", "S3"]
    for field in schema.CLINICAL_FIELDS:  # every clinical field exists, typed by kind
        expected = "float64" if field.kind in (schema.Kind.NUMBER, schema.Kind.BOOLEAN) else "O"
        assert meta[field.name].dtype == expected, field.name
    assert meta["baseline_platelets"].tolist() == [12.0, 20.0, 8.0]
    assert meta["sex"].tolist() == ["female", "male", None]  # case folded to the vocabulary
    assert meta["bleeding_scale"].tolist() == ["ITP-BAT", "WHO", None]
    assert meta["h_pylori"].iloc[:2].tolist() == [1.0, 0.0]
    assert np.isnan(meta["h_pylori"].iloc[2])
    assert meta["age_years"].isna().all()  # absent from the file -> all missing
    assert meta["anti_gpib"].isna().all()
    assert meta["followup_bleeding"].tolist() == [0.0, 0.0, 0.0]
    assert "response" not in meta and "steroid_dependent" not in meta
    assert meta["site"].tolist() == ["Rome", None, "Lyon"]  # extra column kept
    assert meta[schema.SUBJECT_ID].tolist() == ["P1", "P1", "P2"]
    assert all(isinstance(v, str) for v in meta[schema.TREATMENT])
    assert cohort.groups.tolist() == ["P1", "P1", "P2"]
    assert cohort.counts.index.tolist() == ["S1", "S2", "S3"]
    assert cohort.counts.columns.tolist() == list(TAXA)
    assert (cohort.counts.dtypes == "float64").all()
    assert cohort.counts.loc["S2"].tolist() == [40.0, 2500.0, 700.0]
    assert cohort.dropped == ()
    assert cohort.source == tmp_path


def test_counts_follow_metadata_order(tmp_path: Path) -> None:
    reordered = {s: COUNTS[s] for s in ("S3", "S1", "S2")}
    cohort = load_cohort(write(tmp_path, table=table_text(reordered, preamble=False)))
    assert cohort.counts.index.tolist() == ["S1", "S2", "S3"]
    assert cohort.counts.loc["S1"].tolist() == [1200.0, 300.0, 0.0]


def test_q2_types_comment_and_blank_lines_are_skipped(tmp_path: Path) -> None:
    text = tsv(METADATA[:1]) + "#q2:types\tcategorical\tcategorical\tnumeric\tnumeric\t" \
        "categorical\n" + tsv(METADATA[1:2]) + "\n# a comment\n" + tsv(METADATA[2:])
    meta = load_cohort(write(tmp_path, text)).metadata
    assert meta.index.tolist() == ["S1", "S2", "S3"]


def test_line_numbers_count_skipped_lines(tmp_path: Path) -> None:
    text = tsv(METADATA[:1]) + "#q2:types\tcategorical\n\n" + tsv(set_cell(1, "treatment", "x")[1:])
    with pytest.raises(CohortError, match=r"line 4 \(sample 'S1'\), column 'treatment'"):
        load_cohort(write(tmp_path, text))


def test_fingerprint_is_stable_and_tracks_content(tmp_path: Path) -> None:
    first = load_cohort(write(tmp_path / "a")).fingerprint
    assert first == load_cohort(write(tmp_path / "b")).fingerprint
    assert len(first) == 64
    changed = write(tmp_path / "c", set_cell(1, "baseline_platelets", "13"))
    assert load_cohort(changed).fingerprint != first


def test_precomputed_response_column(tmp_path: Path) -> None:
    rows = [r[:4] for r in METADATA]
    rows = with_column("response", ["cr", "NR", "R"], rows)
    meta = load_cohort(write(tmp_path, rows)).metadata
    assert meta["response"].tolist() == ["CR", "NR", "R"]
    assert "followup_platelets" not in meta
    assert response_labels(meta).tolist() == ["CR", "NR", "R"]


def test_loaded_metadata_feeds_outcomes(tmp_path: Path) -> None:
    meta = load_cohort(write(tmp_path)).metadata
    assert response_labels(meta).tolist() == ["R", "NR", "CR"]


@pytest.mark.parametrize("fmt", ["hdf5", "json"])
def test_biom_matches_tsv(tmp_path: Path, fmt: str) -> None:
    tsv_counts = load_cohort(write(tmp_path / "tsv")).counts
    directory = write(tmp_path / "biom")
    (directory / "feature-table.tsv").unlink()
    data = np.array([[COUNTS[s][i] for s in COUNTS] for i in range(len(TAXA))], dtype=float)
    table = biom.Table(data, list(TAXA), list(COUNTS))
    path = directory / "feature-table.biom"
    if fmt == "hdf5":
        with h5py.File(path, "w") as handle:
            table.to_hdf5(handle, "test")
    else:
        path.write_text(table.to_json("test"))
    cohort = load_cohort(directory)
    pd.testing.assert_frame_equal(cohort.counts, tsv_counts)


def test_read_functions_alone(tmp_path: Path) -> None:
    write(tmp_path)
    assert read_metadata(tmp_path / "metadata.tsv").shape[0] == 3
    table = read_feature_table(tmp_path / "feature-table.tsv")
    assert table.shape == (3, 3)
    assert table.index.name == schema.SAMPLE_ID


def test_low_depth_samples_are_dropped(tmp_path: Path) -> None:
    cohort = load_cohort(write(tmp_path), min_reads=2000)  # S1 has 1500 reads
    assert cohort.dropped == (("S1", "1500 reads, below min_reads=2000"),)
    assert cohort.metadata.index.tolist() == ["S2", "S3"]
    assert cohort.counts.index.tolist() == ["S2", "S3"]


def test_relative_abundance_is_not_dropped(tmp_path: Path) -> None:
    percent = {"S1": (80.0, 20.0, 0.0), "S2": (1.25, 61.5, 37.25), "S3": (0.5, 0.25, 99.25)}
    cohort = load_cohort(write(tmp_path, table=table_text(percent)), min_reads=1000)
    assert cohort.dropped == ()
    assert cohort.counts.loc["S2"].tolist() == [1.25, 61.5, 37.25]


def test_docs_cover_every_field() -> None:
    text = DOCS.read_text()
    for name in [*schema.REQUIRED_COLUMNS, *schema.FIELDS_BY_NAME, *schema.TREATMENTS,
                 *schema.BLEEDING_SCALES]:
        assert f"`{name}`" in text, name


# ----------------------------------------------------------------------------- errors

BAD_TABLE_HEADER = "#OTU ID\tS1\tS2\tS3\n"
ERROR_CASES = {
    # name: (metadata rows or text, table text, fragments the message must contain)
    "empty metadata": ("", None, ["metadata.tsv", "empty"]),
    "no sample rows": (tsv(METADATA[:1]), None, ["metadata.tsv", "no sample rows"]),
    "first column not sample-id": (
        [["#SampleID", *METADATA[0][1:]], *METADATA[1:]], None,
        ["metadata.tsv", "line 1", "'sample-id'", "'#SampleID'"]),
    "missing required column": (
        [r[:2] + r[3:] for r in METADATA], None, ["metadata.tsv", "line 1", "'treatment'"]),
    "duplicate column": (with_column("baseline_platelets", ["1", "2", "3"]), None,
                         ["metadata.tsv", "line 1", "'baseline_platelets'", "columns 4, 7"]),
    "duplicate sample id": (
        set_cell(3, schema.SAMPLE_ID, "S1"), None,
        ["metadata.tsv", "line 4 (sample 'S1')", "'sample-id'", "lines 2, 4"]),
    "empty required value": (
        set_cell(2, schema.SUBJECT_ID, ""), None,
        ["metadata.tsv", "line 3 (sample 'S2')", "'subject-id'", "required value is empty"]),
    "unknown treatment": (
        set_cell(1, schema.TREATMENT, "steroids"), None,
        ["metadata.tsv", "line 2 (sample 'S1')", "'treatment'", "'steroids'",
         ", ".join(schema.TREATMENTS)]),
    "category not in vocabulary": (
        with_column("sex", ["female", "other", ""]), None,
        ["metadata.tsv", "line 3 (sample 'S2')", "'sex'", "'other'", "female, male"]),
    "non-numeric number": (
        with_column("age_years", ["forty", "", "50"]), None,
        ["metadata.tsv", "line 2 (sample 'S1')", "'age_years'", "'forty' is not a number"]),
    "number out of range": (
        set_cell(3, "baseline_platelets", "5000"), None,
        ["metadata.tsv", "line 4 (sample 'S3')", "'baseline_platelets'", "0-2000 x10^9/L"]),
    "negative number": (
        with_column("ipf_pct", ["", "-1", ""]), None,
        ["metadata.tsv", "line 3 (sample 'S2')", "'ipf_pct'", "outside"]),
    "boolean not yes/no": (
        with_column("h_pylori", ["true", "no", ""]), None,
        ["metadata.tsv", "line 2 (sample 'S1')", "'h_pylori'", "'true' is not yes or no"]),
    "bleeding score off its scale": (
        with_column("bleeding_scale", ["WHO", "ITP-BAT", ""],
                    with_column("bleeding_score", ["7", "S9", ""])), None,
        ["metadata.tsv", "line 2 (sample 'S1')", "line 3 (sample 'S2')", "'bleeding_score'",
         "0-4", "S2M1O0"]),
    "bleeding score without scale": (
        with_column("bleeding_score", ["", "", "2"]), None,
        ["metadata.tsv", "line 4 (sample 'S3')", "'bleeding_score'", "bleeding_scale"]),
    "bad bleeding scale": (
        with_column("bleeding_scale", ["", "", "Khellaf"],
                    with_column("bleeding_score", ["", "", "2"])), None,
        ["metadata.tsv", "line 4 (sample 'S3')", "'bleeding_scale'", "WHO, ITP-BAT, Buchanan"]),
    "empty follow-up value": (
        set_cell(2, "followup_bleeding", ""), None,
        ["metadata.tsv", "line 3 (sample 'S2')", "'followup_bleeding'", "required value"]),
    "response and follow-up both present": (
        with_column("response", ["CR", "R", "NR"]), None,
        ["metadata.tsv", "line 1", "'response'", "'followup_platelets'", "ambiguous"]),
    "no outcome": ([r[:4] for r in METADATA], None, ["metadata.tsv", "line 1", "no outcome",
                                                     "'followup_platelets'", "'response'"]),
    "follow-up incomplete": (
        [r[:5] for r in METADATA], None,
        ["metadata.tsv", "line 1", "'followup_bleeding'", "missing"]),
    "row with too many cells": (
        tsv(METADATA) + "S4\tP3\tivig\t8\t120\tno\textra\n", None,
        ["metadata.tsv", "line 5", "more cells than the header"]),
    "many problems are summarised": (
        [METADATA[0], *[[f"S{i}", "P", "bad", "x", "1", "no"] for i in range(12)]], None,
        ["metadata.tsv", "24 problems", "line 2 (sample 'S0')", "and 14 more"]),
    "empty table": (None, "# Constructed from biom file\n#OTU ID\tS1\tS2\tS3\n",
                    ["feature-table.tsv", "no taxa"]),
    "table without header": (None, "taxon\tS1\nd__x\t1\n", ["feature-table.tsv", "#OTU ID"]),
    "duplicate sample in table": (
        None, "#OTU ID\tS1\tS2\tS1\nd__Bacteria\t1\t2\t3\n",
        ["feature-table.tsv", "line 1", "sample id 'S1' appears more than once", "columns 2, 4"]),
    "duplicate taxon": (
        None, table_text(taxa=(TAXA[0], TAXA[1], TAXA[0])),
        ["feature-table.tsv", f"taxon id '{TAXA[0]}' appears more than once", "line 3, column",
         "line 5, column '#OTU ID'"]),
    "taxon not a lineage": (
        None, table_text(taxa=(TAXA[0], "4b5eeb300368260019c1fbc7a3c718fc", TAXA[2])),
        ["feature-table.tsv", "line 4, column '#OTU ID'", "'4b5eeb300368260019c1fbc7a3c718fc'",
         "lineage"]),
    "negative count": (
        None, BAD_TABLE_HEADER + f"{TAXA[0]}\t1200\t-4\t10\n",
        ["feature-table.tsv", "line 2", f"taxon '{TAXA[0]}'", "sample 'S2'", "negative"]),
    "non-numeric count": (
        None, BAD_TABLE_HEADER + f"{TAXA[0]}\t1200\t40\tabc\n",
        ["feature-table.tsv", "line 2", f"taxon '{TAXA[0]}'", "sample 'S3'", "'abc'",
         "not a number"]),
    "NaN count": (
        None, BAD_TABLE_HEADER + f"{TAXA[0]}\tnan\t40\t3000\n",
        ["feature-table.tsv", "line 2", "sample 'S1'", "'nan' is not a number"]),
    "empty count cell": (
        None, BAD_TABLE_HEADER + f"{TAXA[0]}\t1200\t\t3000\n",
        ["feature-table.tsv", "line 2", "sample 'S2'", "not a number"]),
    "sample only in metadata": (
        None, table_text({"S1": COUNTS["S1"], "S2": COUNTS["S2"]}),
        ["feature-table.tsv", "in metadata.tsv but not in feature-table.tsv", "'S3' (line 4)"]),
    "sample only in table": (
        None, table_text({**COUNTS, "S9": (5000, 1, 1)}),
        ["feature-table.tsv", "in feature-table.tsv but not in metadata.tsv", "'S9'"]),
    "zero total reads": (
        None, table_text({**COUNTS, "S2": (0, 0, 0)}),
        ["feature-table.tsv", "zero total reads", "'S2'"]),
}


@pytest.mark.parametrize(("metadata", "table", "fragments"), list(ERROR_CASES.values()),
                         ids=list(ERROR_CASES))
def test_validation_errors(tmp_path: Path, metadata: str | list[list[str]] | None,
                           table: str | None, fragments: list[str]) -> None:
    with pytest.raises(CohortError) as caught:
        load_cohort(write(tmp_path, metadata, table))
    message = str(caught.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in:\n{message}"


def test_missing_metadata_file(tmp_path: Path) -> None:
    (tmp_path / "feature-table.tsv").write_text(table_text())
    with pytest.raises(CohortError, match=r"metadata\.tsv: file not found"):
        load_cohort(tmp_path)


def test_missing_feature_table(tmp_path: Path) -> None:
    (tmp_path / "metadata.tsv").write_text(tsv(METADATA))
    with pytest.raises(CohortError, match=r"none of feature-table\.tsv, feature-table\.biom"):
        load_cohort(tmp_path)


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(CohortError, match="cohort directory not found"):
        load_cohort(tmp_path / "nope")


def test_unreadable_biom(tmp_path: Path) -> None:
    directory = write(tmp_path)
    (directory / "feature-table.tsv").unlink()
    (directory / "feature-table.biom").write_text('{"id": ')  # truncated JSON BIOM
    with pytest.raises(CohortError, match=r"feature-table\.biom: not a readable BIOM file"):
        load_cohort(directory)


def test_biom_negative_count_names_taxon_and_sample(tmp_path: Path) -> None:
    directory = write(tmp_path)
    (directory / "feature-table.tsv").unlink()
    data = np.array([[1200, 40, 10], [300, -1, 2000]], dtype=float)
    table = biom.Table(data, list(TAXA[:2]), list(COUNTS))
    (directory / "feature-table.biom").write_text(json.dumps(json.loads(table.to_json("t"))))
    with pytest.raises(CohortError, match=f"taxon '{TAXA[1]}', sample 'S2'.*negative"):
        load_cohort(directory)


def test_everything_below_min_reads(tmp_path: Path) -> None:
    with pytest.raises(CohortError, match=r"feature-table\.tsv: every sample has fewer than "
                                          r"min_reads=100000"):
        load_cohort(write(tmp_path), min_reads=100_000)
