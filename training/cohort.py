"""Read and validate a cohort directory (metadata.tsv + feature table).

A lab prepares a cohort with its own pipeline, so every mistake must come back as one readable
message that names the file, the line (or sample) and the column: the user fixes the file, not
our code. Typing happens here once, so the rest of the project can trust the frame's dtypes.
docs/data-format.md describes the same contract in prose.
"""

from __future__ import annotations

import csv
import hashlib
import io
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from training import schema
from training.schema import Field, Kind

METADATA_FILE = "metadata.tsv"
TABLE_TSV = "feature-table.tsv"
TABLE_BIOM = "feature-table.biom"
TABLE_HEADER = "#OTU ID"
# Looked up in the schema so a renamed field fails at import, not deep inside a load.
RESPONSE = schema.FIELDS_BY_NAME["response"].name
BLEEDING_SCORE = schema.FIELDS_BY_NAME["bleeding_score"].name
BLEEDING_SCALE = schema.FIELDS_BY_NAME["bleeding_scale"].name
# Follow-up columns without which the label cannot be derived (followup_day is informative only).
FOLLOWUP_REQUIRED: tuple[str, ...] = tuple(
    schema.FIELDS_BY_NAME[name].name for name in ("followup_platelets", "followup_bleeding"))
MAX_LISTED = 10


class CohortError(ValueError):
    """A cohort file breaks the data contract; the message says where and how to fix it."""


@dataclass(frozen=True, eq=False)
class Cohort:
    """A validated cohort: typed metadata and counts aligned on the same sample ids."""

    metadata: pd.DataFrame
    counts: pd.DataFrame
    source: Path
    fingerprint: str
    dropped: tuple[tuple[str, str], ...] = ()

    @property
    def groups(self) -> pd.Series:
        """Subject per sample: repeated episodes of one patient must share a CV fold."""
        return self.metadata[schema.SUBJECT_ID]


# --------------------------------------------------------------------------- errors


def _error(path: Path, problems: Sequence[str], total: int | None = None) -> CohortError:
    """One error for many problems, so a user fixes a file in one pass, not ten."""
    total = len(problems) if total is None else total
    if total == 1:
        return CohortError(f"{path}: {problems[0]}")
    listed = "\n  ".join(problems[:MAX_LISTED])
    more = total - min(len(problems), MAX_LISTED)
    tail = f"\n  and {more} more" if more > 0 else ""
    return CohortError(f"{path}: {total} problems:\n  {listed}{tail}")


def _names(values: Iterable[object]) -> str:
    items = [repr(v) for v in values]
    head = ", ".join(items[:MAX_LISTED])
    return head + (f" and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else "")


# --------------------------------------------------------------------------- raw files


def _read_bytes(path: Path) -> bytes:
    if not path.is_file():
        raise CohortError(f"{path}: file not found")
    return path.read_bytes()


def _decode(path: Path, raw: bytes) -> str:
    """UTF-8 with an optional BOM, because spreadsheet exports add one."""
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CohortError(f"{path}: not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    if not text.strip():
        raise CohortError(f"{path}: file is empty")
    return text


def _cells(path: Path, text: str, *, first_line: int = 1, quoting: int = csv.QUOTE_MINIMAL
           ) -> pd.DataFrame:
    """Every cell as a stripped string; row i is file line first_line + i (blank lines kept)."""
    try:
        cells = pd.read_csv(io.StringIO(text), sep="\t", header=None, dtype=str,
                            keep_default_na=False, skip_blank_lines=False, quoting=quoting)
    except pd.errors.ParserError as exc:
        message = re.sub(r"line (\d+)", lambda m: f"line {int(m[1]) + first_line - 1}",
                         str(exc).replace("Error tokenizing data. C error: ", "")).strip()
        if message.startswith("Expected"):
            message += " (a row has more cells than the header)"
        raise CohortError(f"{path}: {message}") from None
    except pd.errors.EmptyDataError:
        raise CohortError(f"{path}: file is empty") from None
    cells = cells.fillna("").astype(object).apply(lambda col: col.str.strip())
    cells.index = pd.RangeIndex(first_line, first_line + len(cells))
    return cells.loc[:, (cells != "").any(axis=0)]  # spreadsheets leave trailing empty columns


def _header(path: Path, header: list[str], what: str, line: int) -> list[str]:
    """Column names must be present and unique, or columns silently shadow each other."""
    problems = [f"line {line}, column {i + 1}: empty {what}"
                for i, name in enumerate(header) if name == ""]
    names = pd.Series(header)
    for name in names[names.duplicated() & (names != "")].unique():
        positions = ", ".join(str(i + 1) for i in np.flatnonzero(names == name))
        problems.append(f"line {line}: {what} {name!r} appears more than once "
                        f"(columns {positions})")
    if problems:
        raise _error(path, problems)
    return header


# --------------------------------------------------------------------------- metadata


class _Rows:
    """Problem collector that knows each row's file line and sample id."""

    def __init__(self, ids: pd.Series) -> None:
        self.ids = ids
        self._problems: list[tuple[int, str]] = []

    def flag(self, mask: pd.Series, column: str, message: Callable[[object], str],
             values: pd.Series) -> None:
        for line in mask.index[mask.to_numpy(dtype=bool)]:
            sample = self.ids.at[line] or "?"
            self._problems.append((line, f"line {line} (sample {sample!r}), column {column!r}: "
                                         f"{message(values.at[line])}"))

    @property
    def problems(self) -> list[str]:
        """In file order, so the user can walk down the file once."""
        return [text for _, text in sorted(self._problems, key=lambda item: item[0])]


def _parse_number(rows: _Rows, raw: pd.Series, field: Field) -> pd.Series:
    numbers = pd.to_numeric(raw.where(raw != ""), errors="coerce").astype("float64")
    rows.flag((raw != "") & ~np.isfinite(numbers), field.name,
              lambda v: f"{v!r} is not a number", raw)
    low = -np.inf if field.minimum is None else field.minimum
    high = np.inf if field.maximum is None else field.maximum
    unit = f" {field.unit}" if field.unit else ""
    outside = np.isfinite(numbers) & ((numbers < low) | (numbers > high))
    rows.flag(outside, field.name,
              lambda v: f"{v} is outside the allowed range {low:g}-{high:g}{unit}", raw)
    return numbers.where(np.isfinite(numbers))


def _parse_boolean(rows: _Rows, raw: pd.Series, field: Field) -> pd.Series:
    lookup: dict[str, float] = {}
    for value in raw.unique():
        try:
            lookup[value] = schema.parse_boolean(value)
        except ValueError:
            continue
    rows.flag(~raw.isin(list(lookup)), field.name,
              lambda v: f"{v!r} is not yes or no", raw)
    return raw.map(lookup).astype("float64")


def _parse_category(rows: _Rows, raw: pd.Series, name: str, categories: Sequence[str]
                    ) -> pd.Series:
    """Case-insensitive match, stored in the schema's spelling so later code compares exactly."""
    lookup = {c.lower(): c for c in categories}
    canonical = raw.str.lower().map(lookup)
    allowed = ", ".join(categories)
    rows.flag((raw != "") & canonical.isna(), name,
              lambda v: f"{v!r} is not one of: {allowed}", raw)
    return _text(canonical.where(canonical.notna(), ""))


def _text(raw: pd.Series) -> pd.Series:
    return raw.astype(object).where(raw != "", None)


def _parse_field(rows: _Rows, raw: pd.Series, field: Field) -> pd.Series:
    if field.kind is Kind.NUMBER:
        return _parse_number(rows, raw, field)
    if field.kind is Kind.BOOLEAN:
        return _parse_boolean(rows, raw, field)
    if field.kind is Kind.CATEGORY:
        return _parse_category(rows, raw, field.name, field.categories or ())
    return _text(raw)


def _check_bleeding(rows: _Rows, frame: pd.DataFrame, raw_scale: pd.Series) -> None:
    """A score means nothing without its scale, and each scale has its own grammar."""
    score, scale = frame[BLEEDING_SCORE], frame[BLEEDING_SCALE]
    scale_flagged = (raw_scale != "") & scale.isna()  # already reported as a bad category
    reasons: dict[int, str] = {}
    for line in score.index[(score.notna() & ~scale_flagged).to_numpy(dtype=bool)]:
        try:
            schema.bleeding_severity(score.at[line], scale.at[line])
        except ValueError as exc:
            reasons[line] = str(exc)
    explained = pd.Series(reasons, index=frame.index, dtype=object)
    rows.flag(explained.notna(), BLEEDING_SCORE, str, explained)


def _outcome_problems(columns: Sequence[str]) -> list[str]:
    """The label must come from exactly one source: never mix a given and a derived label."""
    followups = [c for c in schema.FOLLOWUP_COLUMNS if c in columns]
    if RESPONSE in columns and followups:
        return [f"line 1: both {RESPONSE!r} and follow-up columns ({_names(followups)}) are "
                f"present, so the label is ambiguous; keep either {RESPONSE!r} or the "
                "follow-up columns"]
    if RESPONSE not in columns and not followups:
        optional = [c for c in schema.FOLLOWUP_COLUMNS if c not in FOLLOWUP_REQUIRED]
        return [f"line 1: no outcome columns; add {_names(FOLLOWUP_REQUIRED)} (optionally "
                f"{_names(optional)}), or a precomputed {RESPONSE!r} column"]
    if followups:
        return [f"line 1: column {c!r} is missing; it is required with the follow-up columns"
                for c in FOLLOWUP_REQUIRED if c not in columns]
    return []


def _metadata_header(path: Path, cells: pd.DataFrame) -> list[str]:
    header = cells.iloc[0].tolist()
    if header[0] != schema.SAMPLE_ID:
        raise CohortError(f"{path}: line 1, column 1: the first column must be named "
                          f"{schema.SAMPLE_ID!r} (header on line 1), found {header[0]!r}")
    header = _header(path, header, "column name", 1)
    problems = [f"line 1: required column {c!r} is missing"
                for c in schema.REQUIRED_COLUMNS if c not in header]
    problems += _outcome_problems(header)
    if problems:
        raise _error(path, problems)
    return header


def _parse_metadata(path: Path, raw: bytes) -> tuple[pd.DataFrame, pd.Series]:
    """Typed metadata plus each sample's file line (for cross-file messages)."""
    cells = _cells(path, _decode(path, raw))
    header = _metadata_header(path, cells)
    body = cells.iloc[1:].set_axis(header, axis=1)
    keep = ~body[schema.SAMPLE_ID].str.startswith("#") & (body != "").any(axis=1)
    body = body[keep]
    if body.empty:
        raise CohortError(f"{path}: no sample rows after the header")

    ids = body[schema.SAMPLE_ID]
    rows = _Rows(ids)
    rows.flag(ids == "", schema.SAMPLE_ID, lambda _: "sample id is empty", ids)
    duplicated = ids.duplicated(keep=False) & (ids != "")
    rows.flag(duplicated, schema.SAMPLE_ID,
              lambda v: f"sample id {v!r} is used on lines "
                        f"{', '.join(str(n) for n in ids.index[ids == v])}", ids)
    required = [c for c in schema.REQUIRED_COLUMNS if c != schema.SAMPLE_ID]
    if RESPONSE in header:
        required.append(RESPONSE)
    else:
        required += FOLLOWUP_REQUIRED
    for column in required:
        rows.flag(body[column] == "", column, lambda _: "required value is empty", body[column])

    typed: dict[str, pd.Series] = {
        schema.SUBJECT_ID: _text(body[schema.SUBJECT_ID]),
        schema.TREATMENT: _parse_category(rows, body[schema.TREATMENT], schema.TREATMENT,
                                          schema.TREATMENTS),
    }
    empty = pd.Series("", index=body.index, dtype=object)
    for field in schema.CLINICAL_FIELDS:
        typed[field.name] = _parse_field(rows, body.get(field.name, empty), field)
    for field in schema.OUTCOME_FIELDS:
        if field.name in header:
            typed[field.name] = _parse_field(rows, body[field.name], field)
    known = set(schema.REQUIRED_COLUMNS) | set(schema.FIELDS_BY_NAME)
    for column in header:
        if column not in known:
            typed[column] = _text(body[column])
    frame = pd.DataFrame(typed, index=body.index)
    _check_bleeding(rows, frame, body.get(BLEEDING_SCALE, empty))
    if rows.problems:
        raise _error(path, rows.problems)

    lines = pd.Series(body.index, index=pd.Index(ids.tolist(), dtype=object,
                                                 name=schema.SAMPLE_ID))
    frame.index = lines.index
    return frame, lines


def read_metadata(path: Path) -> pd.DataFrame:
    """metadata.tsv -> frame indexed by sample id, typed once so callers never re-parse.

    Numbers float64 (NaN = missing), booleans float64 1/0/NaN, categories and text object
    (str or None); every clinical field is present, outcome columns only when in the file.
    """
    path = Path(path)
    return _parse_metadata(path, _read_bytes(path))[0]


# --------------------------------------------------------------------------- feature table


def _table_header_line(path: Path, text: str) -> int:
    """0-based index of the '#OTU ID' line; biom writes a '# Constructed from ...' line first."""
    for number, line in enumerate(text.splitlines()):
        first = line.split("\t", 1)[0].strip()
        if first == TABLE_HEADER:
            return number
        if line.strip() and not first.startswith("#"):
            break
    raise CohortError(f"{path}: no header line starting {TABLE_HEADER!r} (the layout "
                      "'biom convert --to-tsv' writes: taxa in rows, samples in columns)")


def _check_taxa(path: Path, taxa: pd.Series, where: Callable[[object], str]) -> None:
    """Taxon ids must be lineages: downstream code recognises taxa by their rank prefixes."""
    problems = [f"{where(i)}: empty taxon id" for i in taxa.index[taxa == ""]]
    for taxon in taxa[taxa.duplicated() & (taxa != "")].unique():
        places = ", ".join(where(i) for i in taxa.index[taxa == taxon])
        problems.append(f"taxon id {taxon!r} appears more than once ({places})")
    not_lineage = taxa[(taxa != "") & ~taxa.map(schema.is_taxon)]
    problems += [f"{where(i)}: taxon id {t!r} is not a lineage string (expected rank prefixes "
                 "such as 'd__Bacteria;p__Firmicutes;...;g__Blautia'"
                 + ("; filter unassigned reads out before collapsing" if "unassigned" in
                    t.lower() else "") + "; see docs/data-format.md)"
                 for i, t in not_lineage.items()]
    if problems:
        raise _error(path, problems)


def _check_counts(path: Path, values: np.ndarray, taxa: Sequence[str], samples: Sequence[str],
                  raw: np.ndarray | None, where: Callable[[int], str]) -> None:
    """Counts must be finite and >= 0; name each bad cell by taxon and sample."""
    bad = ~np.isfinite(values) | (values < 0)
    total = int(bad.sum())
    if not total:
        return
    problems = []
    for row, col in np.argwhere(bad)[:MAX_LISTED]:
        shown = raw[row, col] if raw is not None else values[row, col]
        reason = "is negative" if np.isfinite(values[row, col]) else "is not a number"
        problems.append(f"{where(row)}, taxon {taxa[row]!r}, sample {samples[col]!r}: "
                        f"value {shown!r} {reason}")
    raise _error(path, problems, total)


def _parse_table_tsv(path: Path, raw: bytes) -> pd.DataFrame:
    text = _decode(path, raw)
    start = _table_header_line(path, text)
    body_text = "\n".join(text.splitlines()[start:])
    cells = _cells(path, body_text, first_line=start + 1, quoting=csv.QUOTE_NONE)
    header = _header(path, cells.iloc[0].tolist(), "sample id", start + 1)
    if "taxonomy" in (h.lower() for h in header[1:]):
        raise CohortError(f"{path}: line {start + 1}: column 'taxonomy' found; row ids must be "
                          "the lineage strings themselves (collapse to taxa or rename ASV ids "
                          "to their lineage), not a separate taxonomy column")
    body = cells.iloc[1:]
    body = body[(body != "").any(axis=1) & ~body[0].str.startswith("#")]
    if body.empty or len(header) < 2:
        raise CohortError(f"{path}: the feature table has no taxa or no samples")
    taxa = body[0]
    _check_taxa(path, taxa, lambda line: f"line {line}, column {TABLE_HEADER!r}")
    strings = body.iloc[:, 1:]
    values = strings.apply(lambda col: pd.to_numeric(col, errors="coerce")).to_numpy("float64")
    samples = header[1:]
    _check_counts(path, values, taxa.tolist(), samples, strings.to_numpy(),
                  lambda row: f"line {body.index[row]}")
    return pd.DataFrame(values.T, index=pd.Index(samples, dtype=object, name=schema.SAMPLE_ID),
                        columns=pd.Index(taxa.tolist(), dtype=object))


def _parse_table_biom(path: Path) -> pd.DataFrame:
    import biom  # imported lazily: only BIOM cohorts pay for h5py

    try:
        table = biom.load_table(str(path))
    except Exception as exc:  # biom raises many types for a bad file; all mean "unreadable"
        raise CohortError(f"{path}: not a readable BIOM file ({type(exc).__name__}: {exc})"
                          ) from None
    samples = [str(s) for s in table.ids(axis="sample")]
    taxa = [str(t) for t in table.ids(axis="observation")]
    if not samples or not taxa:
        raise CohortError(f"{path}: the feature table has no taxa or no samples")
    if len(set(samples)) != len(samples):
        dup = pd.Series(samples)
        raise CohortError(f"{path}: duplicate sample ids {_names(dup[dup.duplicated()])}")
    _check_taxa(path, pd.Series(taxa), lambda i: f"observation {int(i) + 1}")
    values = np.asarray(table.matrix_data.toarray(), dtype="float64")
    _check_counts(path, values, taxa, samples, None, lambda row: f"observation {row + 1}")
    return pd.DataFrame(values.T, index=pd.Index(samples, dtype=object, name=schema.SAMPLE_ID),
                        columns=pd.Index(taxa, dtype=object))


def _parse_table(path: Path, raw: bytes) -> pd.DataFrame:
    if path.suffix.lower() == ".biom":
        return _parse_table_biom(path)
    return _parse_table_tsv(path, raw)


def read_feature_table(path: Path) -> pd.DataFrame:
    """feature-table.tsv or .biom (taxa x samples) -> samples x taxa float64 frame."""
    path = Path(path)
    return _parse_table(path, _read_bytes(path))


# --------------------------------------------------------------------------- cohort


def _match_samples(meta_path: Path, lines: pd.Series, table_path: Path, counts: pd.DataFrame
                   ) -> pd.DataFrame:
    """Both files must list the same samples; a silent inner join would hide lost patients."""
    only_meta = lines.index.difference(counts.index, sort=False)
    only_table = counts.index.difference(lines.index, sort=False)
    problems = []
    if len(only_meta):
        listed = ", ".join(f"{s!r} (line {lines[s]})" for s in only_meta[:MAX_LISTED])
        more = len(only_meta) - MAX_LISTED
        listed += f" and {more} more" if more > 0 else ""
        problems.append(f"samples in {meta_path.name} but not in {table_path.name}: {listed}")
    if len(only_table):
        problems.append(f"samples in {table_path.name} but not in {meta_path.name}: "
                        f"{_names(only_table)}")
    if problems:
        raise _error(table_path, problems)
    return counts.loc[lines.index]


def _drop_low_depth(table_path: Path, counts: pd.DataFrame, min_reads: int
                    ) -> tuple[pd.Index, tuple[tuple[str, str], ...]]:
    """Zero-read samples are errors; shallow ones are dropped, but only for integer counts."""
    depth = counts.sum(axis=1)
    empty = depth.index[depth <= 0]
    if len(empty):
        raise CohortError(f"{table_path}: sample column(s) with zero total reads: "
                          f"{_names(empty)}; remove these samples from both files")
    values = counts.to_numpy()
    if not np.all(values == np.floor(values)):
        return counts.index, ()
    low = depth < min_reads
    dropped = tuple((str(s), f"{int(d)} reads, below min_reads={min_reads}")
                    for s, d in depth[low].items())
    if low.all():
        raise CohortError(f"{table_path}: every sample has fewer than min_reads={min_reads} "
                          f"reads (largest: {int(depth.max())}); nothing left to train on")
    return counts.index[~low], dropped


def load_cohort(directory: str | Path, *, min_reads: int = 1000) -> Cohort:
    """Read, validate and align a cohort directory; raises CohortError naming what to fix."""
    if min_reads < 0:
        raise ValueError(f"min_reads must be >= 0, got {min_reads}")
    directory = Path(directory)
    if not directory.is_dir():
        raise CohortError(f"{directory}: cohort directory not found")
    meta_path = directory / METADATA_FILE
    table_path = directory / TABLE_TSV
    if not table_path.is_file() and (directory / TABLE_BIOM).is_file():
        table_path = directory / TABLE_BIOM
    if not table_path.is_file():
        raise CohortError(f"{directory}: file not found: neither {TABLE_TSV} nor {TABLE_BIOM}")
    meta_raw, table_raw = _read_bytes(meta_path), _read_bytes(table_path)

    metadata, lines = _parse_metadata(meta_path, meta_raw)
    counts = _parse_table(table_path, table_raw)
    counts = _match_samples(meta_path, lines, table_path, counts)
    kept, dropped = _drop_low_depth(table_path, counts, min_reads)
    digest = hashlib.sha256(meta_raw)
    digest.update(table_raw)
    return Cohort(metadata=metadata.loc[kept], counts=counts.loc[kept], source=directory,
                  fingerprint=digest.hexdigest(), dropped=dropped)
