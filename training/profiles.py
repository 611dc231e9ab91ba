"""Microbiome profiles in the formats labs produce -> one samples x taxa table.

Each source is read as it comes out of its pipeline (docs/data-format.md):

- a table with lineages as row ids: `feature-table.tsv` (the `biom convert --to-tsv` layout)
  or `feature-table.biom`;
- ASV or OTU ids joined to their lineage by a `taxonomy.tsv` beside the table, or by a
  `taxonomy` column inside it (`biom convert --header-key taxonomy`);
- QIIME 2 artifacts (`feature-table.qza`, `taxonomy.qza`), read as the zip files they are, so
  no QIIME 2 install is needed;
- MetaPhlAn 3/4 merged profiles (`clade_name`, relative abundance in %, every rank listed).

Reads with no taxon (empty id, `Unassigned`, MetaPhlAn's `UNCLASSIFIED`) are counted per
sample and left out of the features, never refused. Tables that list every rank (MetaPhlAn)
keep only their leaves, so a rank is never summed together with its own sub-ranks.
"""

from __future__ import annotations

import csv
import io
import re
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from training import files, schema
from training.files import CohortError
from training.taxonomy import is_unassigned

TABLE_FILES: tuple[str, ...] = ("feature-table.tsv", "feature-table.biom", "feature-table.qza")
TAXONOMY_FILES: tuple[str, ...] = ("taxonomy.tsv", "taxonomy.qza")
TABLE_HEADERS: tuple[str, ...] = ("#OTU ID", "clade_name", "#clade_name", "ID")
TAXONOMY_HEADERS: tuple[str, ...] = ("feature id", "#otuid", "#otu id", "featureid", "id")
# Columns MetaPhlAn writes beside the samples.
ANNOTATION_COLUMNS: tuple[str, ...] = ("ncbi_tax_id", "clade_taxid", "taxonomy")
QIIME_TABLE_TYPES: tuple[str, ...] = ("FeatureTable[Frequency]", "FeatureTable[RelativeFrequency]")
QIIME_TAXONOMY_TYPE = "FeatureData[Taxonomy]"
SEPARATOR_SPACE = re.compile(r"\s*([;|])\s*")  # "d__A; p__B" (QIIME 2) -> "d__A;p__B"


@dataclass(frozen=True, eq=False)
class Profiles:
    """Taxon abundances per sample, with what was set aside on the way."""

    counts: pd.DataFrame  # samples x lineage ids, reads or relative abundances
    unassigned: pd.Series  # per sample, the abundance with no taxon (same unit as counts)
    abundance: str  # "counts" (integer reads) or "relative" (proportions or %)
    source: str  # "table", "qiime2" or "metaphlan"
    rollups: int  # rows dropped because they were sums of other rows (every-rank tables)
    raw: bytes  # the bytes read, for the cohort's fingerprint

    @property
    def unassigned_share(self) -> pd.Series:
        """Share of each sample's abundance that had no taxon."""
        total = self.counts.sum(axis=1) + self.unassigned
        return (self.unassigned / total.where(total > 0)).fillna(0.0).rename("unassigned_share")


@dataclass(frozen=True)
class _Raw:
    """A table as read: row ids, sample ids, values (rows x samples), and where each row is."""

    ids: list[str]
    samples: list[str]
    values: np.ndarray
    where: Callable[[int], str]
    taxonomy: dict[str, str] | None = None  # an in-table taxonomy column
    metaphlan: bool = False


# --------------------------------------------------------------------------- reading tables


def _header_line(path: Path, text: str) -> int:
    """0-based index of the header; biom and MetaPhlAn write comment lines before it."""
    for number, line in enumerate(text.splitlines()):
        first = line.split("\t", 1)[0].strip()
        if first in TABLE_HEADERS:
            return number
        if line.strip() and not first.startswith("#"):
            break
    raise CohortError(f"{path}: no header line starting {TABLE_HEADERS[0]!r} (the layout "
                      "'biom convert --to-tsv' writes: taxa in rows, samples in columns) or "
                      "'clade_name' (a merged MetaPhlAn profile)")


def _read_tsv(path: Path, raw: bytes) -> _Raw:
    text = files.decode(path, raw)
    start = _header_line(path, text)
    body_text = "\n".join(text.splitlines()[start:])
    cells = files.cells(path, body_text, first_line=start + 1, quoting=csv.QUOTE_NONE)
    header = files.header(path, cells.iloc[0].tolist(), "sample id", start + 1)
    body = cells.iloc[1:].set_axis(range(len(header)), axis=1)
    body = body[(body != "").any(axis=1) & ~body[0].str.startswith("#")]
    annotations = {i: h.lower() for i, h in enumerate(header)
                   if i and h.lower() in ANNOTATION_COLUMNS}
    taxonomy = None
    if "taxonomy" in annotations.values():
        column = next(i for i, h in annotations.items() if h == "taxonomy")
        taxonomy = dict(zip(body[0], body[column], strict=True))
    samples = [h for i, h in enumerate(header) if i and i not in annotations]
    if body.empty or not samples:
        raise CohortError(f"{path}: the feature table has no taxa or no samples")
    strings = body.loc[:, [i for i in range(1, len(header)) if i not in annotations]]
    values = strings.apply(lambda col: pd.to_numeric(col, errors="coerce")).to_numpy("float64")
    lines = body.index.to_numpy()
    _check_values(path, values, body[0].tolist(), samples, strings.to_numpy(),
                  lambda row: f"line {lines[row]}")
    return _Raw(body[0].tolist(), samples, values,
                lambda row: f"line {lines[row]}, column {header[0]!r}", taxonomy,
                metaphlan=header[0].lstrip("#") == "clade_name")


def _read_biom(path: Path, data: bytes | None = None) -> _Raw:
    import biom  # imported lazily: only BIOM cohorts pay for h5py

    try:
        if data is None:
            table = biom.load_table(str(path))
        else:  # HDF5 BIOM from inside a QIIME 2 artifact
            import h5py

            with h5py.File(io.BytesIO(data), "r") as handle:
                table = biom.Table.from_hdf5(handle)
    except Exception as exc:  # biom raises many types for a bad file; all mean "unreadable"
        raise CohortError(f"{path}: not a readable BIOM file ({type(exc).__name__}: {exc})"
                          ) from None
    samples = [str(s) for s in table.ids(axis="sample")]
    ids = [str(t) for t in table.ids(axis="observation")]
    if not samples or not ids:
        raise CohortError(f"{path}: the feature table has no taxa or no samples")
    if len(set(samples)) != len(samples):
        dup = pd.Series(samples)
        raise CohortError(f"{path}: duplicate sample ids {files.names(dup[dup.duplicated()])}")
    values = np.asarray(table.matrix_data.toarray(), dtype="float64")
    _check_values(path, values, ids, samples, None, lambda row: f"observation {row + 1}")
    return _Raw(ids, samples, values, lambda row: f"observation {row + 1}")


def _check_values(path: Path, values: np.ndarray, ids: Sequence[str], samples: Sequence[str],
                  raw: np.ndarray | None, where: Callable[[int], str]) -> None:
    """Abundances must be finite and >= 0; name each bad cell by taxon and sample."""
    bad = ~np.isfinite(values) | (values < 0)
    total = int(bad.sum())
    if not total:
        return
    problems = []
    for row, col in np.argwhere(bad)[:files.MAX_LISTED]:
        shown = raw[row, col] if raw is not None else values[row, col]
        reason = "is negative" if np.isfinite(values[row, col]) else "is not a number"
        problems.append(f"{where(row)}, taxon {ids[row]!r}, sample {samples[col]!r}: "
                        f"value {shown!r} {reason}")
    raise files.error(path, problems, total)


def _read_taxonomy_tsv(path: Path, raw: bytes) -> dict[str, str]:
    """QIIME 2's taxonomy.tsv: `Feature ID`, `Taxon` (and `Confidence`) columns."""
    text = "\n".join(line for line in files.decode(path, raw).splitlines()
                     if not line.startswith("#q2:"))
    cells = files.cells(path, text, quoting=csv.QUOTE_NONE)
    if cells.shape[1] < 2 or cells.iat[0, 0].lower() not in TAXONOMY_HEADERS:
        raise CohortError(f"{path}: line 1: expected the columns 'Feature ID' and 'Taxon' "
                          "(the taxonomy.tsv QIIME 2 exports)")
    body = cells.iloc[1:]
    duplicated = body[0][body[0].duplicated()]
    if len(duplicated):
        raise CohortError(f"{path}: feature ids listed more than once: "
                          f"{files.names(duplicated.unique())}")
    return dict(zip(body[0], body[1], strict=True))


# --------------------------------------------------------------------------- QIIME 2 artifacts


def _artifact(path: Path, raw: bytes, types: Sequence[str], member: str) -> bytes:
    """The data file inside a .qza (a zip: <uuid>/metadata.yaml, <uuid>/data/...)."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(raw))
    except zipfile.BadZipFile:
        raise CohortError(f"{path}: not a QIIME 2 artifact (a .qza is a zip file)") from None
    with archive:
        names = archive.namelist()
        metadata = next((n for n in names if n.count("/") == 1 and
                         n.endswith("/metadata.yaml")), None)
        kind = ""
        if metadata:
            for line in archive.read(metadata).decode("utf-8", "replace").splitlines():
                if line.startswith("type:"):
                    kind = line.split(":", 1)[1].strip().strip("'\"")
        if kind not in types:
            raise CohortError(f"{path}: a QIIME 2 artifact of type {kind or 'unknown'!r}; "
                              f"expected {' or '.join(types)}")
        data = next((n for n in names if n.endswith(f"/data/{member}")), None)
        if data is None:
            raise CohortError(f"{path}: the artifact has no data/{member}")
        return archive.read(data)


# --------------------------------------------------------------------------- to taxa


def _lineages(path: Path, table: _Raw, taxonomy: dict[str, str] | None,
              taxonomy_path: Path | None) -> list[str]:
    """Row ids as lineages: themselves, or looked up in the taxonomy."""
    taxonomy = taxonomy or table.taxonomy
    if taxonomy is None:
        return table.ids
    missing = [i for i in table.ids if i not in taxonomy]
    if missing:
        where = taxonomy_path or f"{path} (taxonomy column)"
        raise CohortError(f"{where}: no taxon for {len(missing)} feature id(s) of {path.name}: "
                          f"{files.names(missing)}; classify every feature of the table")
    return [taxonomy[i] for i in table.ids]


def _check_lineages(path: Path, table: _Raw, lineages: list[str], joined: bool) -> None:
    """Assigned rows must be lineages; a raw lineage table must not repeat one."""
    series = pd.Series(lineages)
    assigned = ~series.map(is_unassigned)
    problems = []
    if not joined:
        for taxon in series[series.duplicated() & assigned].unique():
            places = ", ".join(table.where(i) for i in np.flatnonzero(series == taxon))
            problems.append(f"taxon id {taxon!r} appears more than once ({places})")
    not_lineage = series[assigned & ~series.map(schema.is_taxon)]
    hint = ("; ASV or OTU ids need their taxonomy: put taxonomy.tsv (or taxonomy.qza) beside "
            "the table" if not joined else "")
    problems += [f"{table.where(i)}: taxon id {t!r} is not a lineage string (expected rank "
                 "prefixes such as "
                 f"'d__Bacteria;p__Firmicutes;...;g__Blautia'{hint}; see docs/data-format.md)"
                 for i, t in not_lineage.items()]
    if problems:
        raise files.error(path, problems)


def _rollups(lineages: list[str], values: np.ndarray, source: str, joined: bool
             ) -> np.ndarray:
    """Rows that total other rows: keeping them would count a read once per rank.

    A MetaPhlAn profile lists every rank; a clade with any sub-clade listed is a total
    (structurally, whatever its value: a genus can carry a little more than its species),
    so only the deepest rows are kept. A lineage table may list a rank's total too: such a
    row is dropped when it equals the sum of its children in every sample. Rows joined from
    ASV ids to their taxonomy are reads, never totals.
    """
    rollup = np.zeros(len(lineages), dtype=bool)
    if joined:
        return rollup
    index = {taxon: i for i, taxon in enumerate(lineages)}
    children: dict[int, list[int]] = {}
    for i, taxon in enumerate(lineages):
        for separator in ("|", ";"):
            parent, found, _ = taxon.rpartition(separator)
            if found and parent.strip() in index:
                children.setdefault(index[parent.strip()], []).append(i)
    for parent, rows in children.items():
        rollup[parent] = source == "metaphlan" or np.allclose(
            values[parent], values[rows].sum(axis=0), rtol=0.02, atol=1e-4)
    return rollup


def read_profiles(table_path: Path, taxonomy_path: Path | None = None) -> Profiles:
    """Read a feature table (and its taxonomy) in any supported format, see the module doc."""
    raw = files.read_bytes(table_path)
    source = "table"
    taxonomy = None
    if table_path.suffix.lower() == ".qza":
        source = "qiime2"
        table = _read_biom(table_path, _artifact(table_path, raw, QIIME_TABLE_TYPES,
                                                 "feature-table.biom"))
    elif table_path.suffix.lower() == ".biom":
        table = _read_biom(table_path)
    else:
        table = _read_tsv(table_path, raw)
        source = "metaphlan" if table.metaphlan else source
    if taxonomy_path is not None:
        taxonomy_raw = files.read_bytes(taxonomy_path)
        raw += taxonomy_raw
        if taxonomy_path.suffix.lower() == ".qza":
            taxonomy_raw = _artifact(taxonomy_path, taxonomy_raw, (QIIME_TAXONOMY_TYPE,),
                                     "taxonomy.tsv")
        taxonomy = _read_taxonomy_tsv(taxonomy_path, taxonomy_raw)
    lineages = [SEPARATOR_SPACE.sub(r"\1", t.strip())
                for t in _lineages(table_path, table, taxonomy, taxonomy_path)]
    joined = taxonomy is not None or table.taxonomy is not None
    _check_lineages(table_path, table, lineages, joined)
    rollup = _rollups(lineages, table.values, source, joined)
    unassigned = np.array([is_unassigned(t) for t in lineages])
    keep = ~rollup & ~unassigned
    kept = pd.DataFrame(table.values[keep].T, index=pd.Index(table.samples, dtype=object,
                                                             name=schema.SAMPLE_ID),
                        columns=pd.Index(np.asarray(lineages, dtype=object)[keep]))
    kept = kept.T.groupby(level=0, sort=False).sum().T if joined else kept
    if kept.shape[1] == 0:
        raise CohortError(f"{table_path}: no reads are assigned to any taxon")
    integer = bool(np.all(table.values == np.floor(table.values)))
    return Profiles(
        counts=kept.rename_axis(columns=None),
        unassigned=pd.Series(table.values[unassigned & ~rollup].sum(axis=0), index=kept.index),
        abundance="counts" if integer and source != "metaphlan" else "relative",
        source=source, rollups=int(rollup.sum()), raw=raw)


def read_feature_table(path: Path) -> pd.DataFrame:
    """A feature table on its own (lineage row ids) -> samples x taxa float64 frame."""
    return read_profiles(Path(path)).counts


def find_profiles(directory: Path) -> tuple[Path, Path | None]:
    """The cohort's table and, when present, the taxonomy its ids are looked up in."""
    table = next((directory / name for name in TABLE_FILES if (directory / name).is_file()),
                 None)
    if table is None:
        raise CohortError(f"{directory}: file not found: none of {', '.join(TABLE_FILES)}")
    taxonomy = next((directory / name for name in TAXONOMY_FILES
                     if (directory / name).is_file()), None)
    return table, taxonomy
