"""Read and validate a cohort directory (metadata.tsv + feature table).

A lab prepares a cohort with its own pipeline, so every mistake must come back as one readable
message that names the file, the line (or sample) and the column: the user fixes the file, not
our code. Typing happens here once, so the rest of the project can trust the frame's dtypes.
docs/data-format.md describes the same contract in prose.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from training import files, schema
from training.files import MAX_LISTED, CohortError
from training.profiles import Profiles, find_profiles, read_profiles
from training.schema import Field, Kind

METADATA_FILE = "metadata.tsv"
# Looked up in the schema so a renamed field fails at import, not deep inside a load.
RESPONSE = schema.FIELDS_BY_NAME["response"].name
BLEEDING_SCORE = schema.FIELDS_BY_NAME["bleeding_score"].name
BLEEDING_SCALE = schema.FIELDS_BY_NAME["bleeding_scale"].name
# Follow-up columns without which the label cannot be derived (followup_day is informative only).
FOLLOWUP_REQUIRED: tuple[str, ...] = tuple(
    schema.FIELDS_BY_NAME[name].name for name in ("followup_platelets", "followup_bleeding"))


@dataclass(frozen=True, eq=False)
class Cohort:
    """A validated cohort: typed metadata and counts aligned on the same sample ids."""

    metadata: pd.DataFrame
    counts: pd.DataFrame
    source: Path
    fingerprint: str
    dropped: tuple[tuple[str, str], ...] = ()  # (sample, why) set aside by the depth filter
    unassigned_share: pd.Series | None = None  # per sample, share of reads with no taxon
    abundance: str = "counts"  # or "relative" (profiles.Profiles.abundance)
    profile_source: str = "table"  # "table", "qiime2" or "metaphlan"
    min_reads: int = 0
    depth_hint: str = ""

    @property
    def groups(self) -> pd.Series:
        """Subject per sample: repeated episodes of one patient must share a CV fold."""
        return self.metadata[schema.SUBJECT_ID]


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
        return [f"line 1: both {RESPONSE!r} and follow-up columns ({files.names(followups)}) are "
                f"present, so the label is ambiguous; keep either {RESPONSE!r} or the "
                "follow-up columns"]
    if RESPONSE not in columns and not followups:
        optional = [c for c in schema.FOLLOWUP_COLUMNS if c not in FOLLOWUP_REQUIRED]
        return [f"line 1: no outcome columns; add {files.names(FOLLOWUP_REQUIRED)} (optionally "
                f"{files.names(optional)}), or a precomputed {RESPONSE!r} column"]
    if followups:
        return [f"line 1: column {c!r} is missing; it is required with the follow-up columns"
                for c in FOLLOWUP_REQUIRED if c not in columns]
    return []


def _metadata_header(path: Path, cells: pd.DataFrame) -> list[str]:
    header = cells.iloc[0].tolist()
    if header[0] != schema.SAMPLE_ID:
        raise CohortError(f"{path}: line 1, column 1: the first column must be named "
                          f"{schema.SAMPLE_ID!r} (header on line 1), found {header[0]!r}")
    header = files.header(path, header, "column name", 1)
    problems = [f"line 1: required column {c!r} is missing"
                for c in schema.REQUIRED_COLUMNS if c not in header]
    problems += _outcome_problems(header)
    if problems:
        raise files.error(path, problems)
    return header


def _parse_metadata(path: Path, raw: bytes) -> tuple[pd.DataFrame, pd.Series]:
    """Typed metadata plus each sample's file line (for cross-file messages)."""
    cells = files.cells(path, files.decode(path, raw))
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
        raise files.error(path, rows.problems)

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
    return _parse_metadata(path, files.read_bytes(path))[0]


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
                        f"{files.names(only_table)}")
    if problems:
        raise files.error(table_path, problems)
    return counts.loc[lines.index]


def _drop_low_depth(table_path: Path, profiles: Profiles, min_reads: int
                    ) -> tuple[pd.Index, tuple[tuple[str, str], ...]]:
    """Zero-read samples are errors; shallow ones are dropped, but only for integer counts
    (a relative-abundance profile carries no read depth to judge)."""
    depth = profiles.counts.sum(axis=1) + profiles.unassigned
    empty = depth.index[depth <= 0]
    if len(empty):
        raise CohortError(f"{table_path}: sample column(s) with zero total reads: "
                          f"{files.names(empty)}; remove these samples from both files")
    if profiles.abundance != "counts":
        return depth.index, ()
    low = depth < min_reads
    dropped = tuple((str(s), f"{int(d)} reads, below min_reads={min_reads}")
                    for s, d in depth[low].items())
    if low.all():
        raise CohortError(f"{table_path}: every sample has fewer than min_reads={min_reads} "
                          f"reads (largest: {int(depth.max())}, median {int(depth.median())}); "
                          f"{suggest_min_reads(depth)}")
    return depth.index[~low], dropped


def suggest_min_reads(depth: pd.Series) -> str:
    """An option that keeps most of a shallow cohort: a 16S run of a few hundred reads per
    sample is normal, and 1,000 is a shotgun default."""
    keep_90 = int(np.floor(np.quantile(depth, 0.1)))
    return (f"pass --min-reads {keep_90} to keep 90% of the samples "
            f"(median depth {int(depth.median())} reads)")


def depth_report(cohort: Cohort) -> list[str]:
    """What the depth filter and the taxonomy set aside, for validate and train to print."""
    lines = []
    total = len(cohort.metadata) + len(cohort.dropped)
    if cohort.dropped:
        lines.append(f"{len(cohort.dropped)} of {total} samples dropped below "
                     f"min_reads={cohort.min_reads}: "
                     + ", ".join(f"{s} ({why.split(',')[0]})" for s, why in cohort.dropped[:5])
                     + (" ..." if len(cohort.dropped) > 5 else ""))
        if len(cohort.dropped) > total / 2:
            lines.append(f"most of the cohort is below min_reads: {cohort.depth_hint}")
    share = cohort.unassigned_share
    if share is not None and share.gt(0).any():
        lines.append(f"reads without a taxon (left out of the features): median "
                     f"{100 * share.median():.1f}%, max {100 * share.max():.1f}% "
                     f"(sample {share.idxmax()})")
    return lines


def load_cohort(directory: str | Path, *, min_reads: int = 1000) -> Cohort:
    """Read, validate and align a cohort directory; raises CohortError naming what to fix."""
    if min_reads < 0:
        raise ValueError(f"min_reads must be >= 0, got {min_reads}")
    directory = Path(directory)
    if not directory.is_dir():
        raise CohortError(f"{directory}: cohort directory not found")
    meta_path = directory / METADATA_FILE
    meta_raw = files.read_bytes(meta_path)
    table_path, taxonomy_path = find_profiles(directory)

    metadata, lines = _parse_metadata(meta_path, meta_raw)
    profiles = read_profiles(table_path, taxonomy_path)
    counts = _match_samples(meta_path, lines, table_path, profiles.counts)
    profiles = replace(profiles, counts=counts, unassigned=profiles.unassigned.loc[counts.index])
    kept, dropped = _drop_low_depth(table_path, profiles, min_reads)
    depth = counts.sum(axis=1) + profiles.unassigned
    digest = hashlib.sha256(meta_raw)
    digest.update(profiles.raw)
    return Cohort(metadata=metadata.loc[kept], counts=counts.loc[kept], source=directory,
                  fingerprint=digest.hexdigest(), dropped=dropped,
                  unassigned_share=profiles.unassigned_share.loc[kept],
                  abundance=profiles.abundance, profile_source=profiles.source,
                  min_reads=min_reads, depth_hint=suggest_min_reads(depth))
