"""The IWG treatment-response label (Rodeghiero et al., Blood 2009;113:2386).

Cohorts define "response" differently, and a model trained on one definition and compared
with another is silently wrong, so each definition is selected by name and never mixed.
A missing follow-up value is an error, not a guess: guessing "no bleeding" would turn an
unknown outcome into a response.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike

from training import schema

DEFINITIONS: tuple[str, ...] = ("iwg", "iwg_or", "ge50")
TARGETS: tuple[str, ...] = ("responded", "complete")

CR, R, NR = schema.RESPONSES
# Looked up in the schema so a renamed field fails at import, not on the first cohort.
RESPONSE = schema.FIELDS_BY_NAME["response"].name
FOLLOWUP_PLATELETS = schema.FIELDS_BY_NAME["followup_platelets"].name
FOLLOWUP_BLEEDING = schema.FIELDS_BY_NAME["followup_bleeding"].name
STEROID_DEPENDENT = schema.FIELDS_BY_NAME["steroid_dependent"].name
BASELINE_PLATELETS = schema.FIELDS_BY_NAME["baseline_platelets"].name

COMPLETE_MIN = 100.0  # x10^9/L, CR in every definition
RESPONSE_MIN = 30.0  # x10^9/L, R in iwg and iwg_or
GE50_MIN = 50.0  # x10^9/L, R in ge50 (some TPO-RA trials)
FOLD = 2.0  # rise over baseline, R in iwg and iwg_or
POSITIVE: dict[str, tuple[str, ...]] = {"responded": (CR, R), "complete": (CR,)}


def _check_name(value: str, valid: Sequence[str], what: str) -> None:
    if value not in valid:
        raise ValueError(f"unknown {what} {value!r}; expected one of: {', '.join(valid)}")


def _numbers(values: ArrayLike, name: str) -> np.ndarray:
    try:
        return np.asarray(values, dtype="float64")
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be numbers") from None


def _flags(values: ArrayLike, name: str) -> np.ndarray:
    """yes/no, booleans or 1.0/0.0 -> 1.0/0.0/NaN, so raw and loaded metadata both work."""
    array = np.asarray(values)
    if array.dtype.kind in "OUS":
        array = np.array([_flag(v, name) for v in array.ravel()],
                         dtype="float64").reshape(array.shape)
    array = array.astype("float64")
    bad = ~np.isnan(array) & (array != 0) & (array != 1)
    if bad.any():
        raise ValueError(f"{name} must be yes/no (or 1/0), got {array[bad][0]!r}")
    return array


def _flag(value: object, name: str) -> float:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return np.nan
    if isinstance(value, str):
        try:
            return schema.parse_boolean(value)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None
    return float(value)  # type: ignore[arg-type]  # bools and numbers


def _require(values: np.ndarray, name: str) -> None:
    missing = np.flatnonzero(np.isnan(values))
    if missing.size:
        raise ValueError(f"{name} is missing at positions {missing[:10].tolist()}")


def classify(
    followup_platelets: ArrayLike,
    baseline_platelets: ArrayLike,
    followup_bleeding: ArrayLike,
    steroid_dependent: ArrayLike | None = None,
    definition: str = "iwg",
) -> np.ndarray:
    """CR/R/NR per episode under one named definition (thresholds inclusive, x10^9/L).

    A "2-fold rise" also needs an actual rise (followup > baseline), so a count stuck at 0
    is not a response. Missing steroid_dependent means not dependent; missing platelets or
    bleeding is an error.
    """
    _check_name(definition, DEFINITIONS, "definition")
    followup = _numbers(followup_platelets, FOLLOWUP_PLATELETS)
    baseline = _numbers(baseline_platelets, BASELINE_PLATELETS)
    bleeding = _flags(followup_bleeding, FOLLOWUP_BLEEDING)
    dependent = np.zeros_like(followup) if steroid_dependent is None else np.nan_to_num(
        _flags(steroid_dependent, STEROID_DEPENDENT), nan=0.0)
    followup, baseline, bleeding, dependent = np.broadcast_arrays(
        followup, baseline, bleeding, dependent)
    for values, name in ((followup, FOLLOWUP_PLATELETS), (baseline, BASELINE_PLATELETS),
                         (bleeding, FOLLOWUP_BLEEDING)):
        _require(values, name)

    eligible = (bleeding == 0) & (dependent == 0)
    doubled = (followup >= FOLD * baseline) & (followup > baseline)
    if definition == "iwg":
        responded = (followup >= RESPONSE_MIN) & doubled
    elif definition == "iwg_or":
        responded = (followup >= RESPONSE_MIN) | doubled
    else:
        responded = followup >= GE50_MIN
    complete = followup >= COMPLETE_MIN
    labels = np.select([eligible & complete, eligible & responded], [CR, R], NR)
    return labels.astype(object)


def _missing_for(metadata: pd.DataFrame, values: np.ndarray, name: str) -> None:
    missing = metadata.index[np.isnan(values)]
    if len(missing):
        shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
        raise ValueError(f"{name} is missing for {len(missing)} sample(s): {shown}")


def _derived(metadata: pd.DataFrame, definition: str) -> pd.Series:
    absent = [c for c in (FOLLOWUP_PLATELETS, FOLLOWUP_BLEEDING, BASELINE_PLATELETS)
              if c not in metadata]
    if absent:
        raise ValueError(f"cannot derive the response: column(s) missing: {', '.join(absent)}")
    followup = _numbers(metadata[FOLLOWUP_PLATELETS], FOLLOWUP_PLATELETS)
    baseline = _numbers(metadata[BASELINE_PLATELETS], BASELINE_PLATELETS)
    bleeding = _flags(metadata[FOLLOWUP_BLEEDING], FOLLOWUP_BLEEDING)
    for values, name in ((followup, FOLLOWUP_PLATELETS), (baseline, BASELINE_PLATELETS),
                         (bleeding, FOLLOWUP_BLEEDING)):
        _missing_for(metadata, values, name)
    dependent = metadata.get(STEROID_DEPENDENT)
    labels = classify(followup, baseline, bleeding, dependent, definition)
    return pd.Series(labels, index=metadata.index, name=RESPONSE, dtype=object)


def _given(metadata: pd.DataFrame) -> pd.Series:
    responses = metadata[RESPONSE]
    missing = responses.isna() | (responses.astype(str).str.strip() == "")
    if missing.any():
        shown = ", ".join(map(str, metadata.index[missing][:10]))
        raise ValueError(f"{RESPONSE} is missing for {int(missing.sum())} sample(s): {shown}")
    unknown = ~responses.isin(schema.RESPONSES)
    if unknown.any():
        sample = metadata.index[unknown][0]
        raise ValueError(f"{RESPONSE} of sample {sample!r} is {responses[sample]!r}; expected "
                         f"one of: {', '.join(schema.RESPONSES)}")
    return responses.astype(object).rename(RESPONSE)


def response_labels(metadata: pd.DataFrame, definition: str = "iwg") -> pd.Series:
    """CR/R/NR per sample, derived from follow-up columns or taken from `response`.

    A precomputed `response` is the lab's own scoring and cannot be re-derived, so
    `definition` does not change it; the two sources are never combined.
    """
    _check_name(definition, DEFINITIONS, "definition")
    followups = [c for c in schema.FOLLOWUP_COLUMNS if c in metadata]
    if followups and RESPONSE in metadata:
        raise ValueError(f"both {RESPONSE!r} and follow-up columns ({', '.join(followups)}) "
                         "are present; the label is ambiguous, keep one")
    if followups:
        return _derived(metadata, definition)
    if RESPONSE in metadata:
        return _given(metadata)
    raise ValueError(f"no outcome: need {FOLLOWUP_PLATELETS} and {FOLLOWUP_BLEEDING}, "
                     f"or a {RESPONSE!r} column")


def target(responses: pd.Series, target: str = "responded") -> pd.Series:
    """CR/R/NR -> 0/1: `responded` counts CR and R, `complete` only CR."""
    _check_name(target, TARGETS, "target")
    unknown = ~responses.isin(schema.RESPONSES)
    if unknown.any():
        sample = responses.index[unknown][0]
        raise ValueError(f"response of sample {sample!r} is {responses[sample]!r}; expected "
                         f"one of: {', '.join(schema.RESPONSES)}")
    return responses.isin(POSITIVE[target]).astype("int64").rename(target)
