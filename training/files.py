"""Reading tab-separated cohort files: one error listing every problem, by file and line.

A lab prepares a cohort with its own tools, so every mistake must come back as one readable
message that names the file, the line (or sample) and the column.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

MAX_LISTED = 10


class CohortError(ValueError):
    """A cohort file breaks the data contract; the message says where and how to fix it."""


def error(path: Path, problems: Sequence[str], total: int | None = None) -> CohortError:
    """One error for many problems, so a user fixes a file in one pass, not ten."""
    total = len(problems) if total is None else total
    if total == 1:
        return CohortError(f"{path}: {problems[0]}")
    listed = "\n  ".join(problems[:MAX_LISTED])
    more = total - min(len(problems), MAX_LISTED)
    tail = f"\n  and {more} more" if more > 0 else ""
    return CohortError(f"{path}: {total} problems:\n  {listed}{tail}")


def names(values: Iterable[object]) -> str:
    items = [repr(v) for v in values]
    head = ", ".join(items[:MAX_LISTED])
    return head + (f" and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else "")


def read_bytes(path: Path) -> bytes:
    if not path.is_file():
        raise CohortError(f"{path}: file not found")
    return path.read_bytes()


def decode(path: Path, raw: bytes) -> str:
    """UTF-8 with an optional BOM, because spreadsheet exports add one."""
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CohortError(f"{path}: not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    if not text.strip():
        raise CohortError(f"{path}: file is empty")
    return text


def cells(path: Path, text: str, *, first_line: int = 1, quoting: int = csv.QUOTE_MINIMAL
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


def header(path: Path, columns: list[str], what: str, line: int) -> list[str]:
    """Column names must be present and unique, or columns silently shadow each other."""
    problems = [f"line {line}, column {i + 1}: empty {what}"
                for i, name in enumerate(columns) if name == ""]
    given = pd.Series(columns)
    for name in given[given.duplicated() & (given != "")].unique():
        positions = ", ".join(str(i + 1) for i in np.flatnonzero(given == name))
        problems.append(f"line {line}: {what} {name!r} appears more than once "
                        f"(columns {positions})")
    if problems:
        raise error(path, problems)
    return columns
