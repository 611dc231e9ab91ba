"""The IWG treatment-response label (Rodeghiero et al., Blood 2009;113:2386).

Cohorts define "response" differently, and a model trained on one definition and compared
with another is silently wrong, so each definition is selected by name and never mixed.
A missing follow-up value is an error, not a guess: guessing "no bleeding" would turn an
unknown outcome into a response. Episodes that cannot show a response (baseline already at the
definition's threshold) or were assessed outside the treatment's response window are excluded
with a reason rather than labelled, since either label would be noise.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

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
FOLLOWUP_DAY = schema.FIELDS_BY_NAME["followup_day"].name
TREATMENT = schema.TREATMENT
STEROID = schema.TREATMENTS[schema.TREATMENTS.index("corticosteroid")]

COMPLETE_MIN = 100.0  # x10^9/L, CR in every definition
RESPONSE_MIN = 30.0  # x10^9/L, R in iwg and iwg_or
GE50_MIN = 50.0  # x10^9/L, R in ge50 (some TPO-RA trials)
FOLD = 2.0  # rise over baseline, R in iwg and iwg_or
POSITIVE: dict[str, tuple[str, ...]] = {"responded": (CR, R), "complete": (CR,)}
# A baseline at or above this count already scores as a response under the definition, so the
# episode cannot show one (iwg: 30-99 can still double, so only the CR count rules it out).
BASELINE_CEILINGS: dict[str, float] = {"iwg": COMPLETE_MIN, "iwg_or": RESPONSE_MIN,
                                       "ge50": GE50_MIN}
# Days after treatment start (inclusive) in which the response assessment must fall. Our own
# defaults from typical onset and trial end points; check them against the trial definitions.
DEFAULT_WINDOWS: dict[str, tuple[int, int]] = {
    "corticosteroid": (7, 30),  # domain: steroid response scored within 4 weeks
    "ivig": (1, 14),
    "tpo_ra": (7, 90),
    "rituximab": (28, 180),
    "fostamatinib": (28, 180),
    "splenectomy": (14, 90),
    "h_pylori_eradication": (30, 270),
}
REASON = "reason"


@dataclass(frozen=True, eq=False)
class Outcomes:
    """Labels for the episodes fit to train on, and why the others were left out."""

    labels: pd.Series  # CR/R/NR of the included episodes, indexed by sample id
    excluded: pd.DataFrame  # indexed by sample id, column "reason"
    # episodes with a response window whose followup_day is unknown
    unchecked: pd.Index = field(default_factory=lambda: pd.Index([]))
    # corticosteroid CR/R episodes scored without a steroid_dependent column (read as "no")
    assumed: pd.Index = field(default_factory=lambda: pd.Index([]))

    @property
    def unchecked_window(self) -> int:
        """Included episodes whose response window could not be checked."""
        return int(self.unchecked.isin(self.labels.index).sum())

    @property
    def dependence_assumed(self) -> int:
        """Included episodes whose CR/R assumes no steroid dependence."""
        return int(self.assumed.isin(self.labels.index).sum())

    def warnings(self) -> list[str]:
        """What the labels rest on that the cohort did not say, for the run's warnings."""
        out = []
        if self.dependence_assumed:
            out.append(f"no steroid_dependent column: {self.dependence_assumed} corticosteroid "
                       "episode(s) scored CR/R assume the patient was not steroid-dependent "
                       "(docs/data-format.md)")
        if self.unchecked_window:
            out.append(f"followup_day missing for {self.unchecked_window} episode(s): their "
                       "response window could not be checked")
        return out


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
    is not a response. Missing steroid_dependent means not dependent here (arrays carry no
    treatment); response_labels and derive_outcomes refuse it on steroid responders. Missing
    platelets or bleeding is an error.
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
        raise ValueError(f"{name} is missing for {len(missing)} sample(s): {_shown(missing)}")


def _shown(ids: pd.Index) -> str:
    return ", ".join(map(str, ids[:10])) + (" ..." if len(ids) > 10 else "")


def _scored(metadata: pd.DataFrame, definition: str
            ) -> tuple[pd.Series, np.ndarray, np.ndarray]:
    """Labels reading a missing steroid_dependent as "no", and where that reading mattered.

    The arrays mark episodes whose CR/R rests on that reading: corticosteroid (or
    unknown-treatment) episodes with an empty steroid_dependent cell (an error), and, when
    the column is absent altogether, every such episode (documented, and reported).
    """
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
    if STEROID_DEPENDENT in metadata:
        dependent = _flags(metadata[STEROID_DEPENDENT], STEROID_DEPENDENT)
    else:  # never assessed: documented choice, nobody counts as dependent
        dependent = np.zeros(len(metadata))
    labels = classify(followup, baseline, bleeding, np.nan_to_num(dependent, nan=0.0),
                      definition)
    rests_on_it = _maybe_steroid(metadata) & (labels != NR)
    assumed = rests_on_it if STEROID_DEPENDENT not in metadata else np.zeros(len(labels), bool)
    return (pd.Series(labels, index=metadata.index, name=RESPONSE, dtype=object),
            np.isnan(dependent) & rests_on_it, assumed)


def _maybe_steroid(metadata: pd.DataFrame) -> np.ndarray:
    """Corticosteroid episodes, counting an unknown treatment as one (it might be)."""
    if TREATMENT not in metadata:
        return np.ones(len(metadata), dtype=bool)
    treatment = metadata[TREATMENT]
    text = treatment.astype(str).str.strip().str.lower()
    return (treatment.isna() | (text == "") | (text == STEROID)).to_numpy(dtype=bool)


def _refuse_unassessed(metadata: pd.DataFrame, unassessed: np.ndarray) -> None:
    """Dependence turns a steroid CR/R into NR, so an empty cell cannot be read as "no"."""
    ids = metadata.index[unassessed]
    if not len(ids):
        return
    unknown = "" if TREATMENT in metadata else (
        f" (there is no {TREATMENT!r} column, so every episode may be a corticosteroid one)")
    raise ValueError(
        f"{STEROID_DEPENDENT} is empty for {len(ids)} corticosteroid episode(s) that would "
        f"otherwise score CR/R: {_shown(ids)}{unknown}; fill it with yes or no, or drop the "
        f"{STEROID_DEPENDENT} column if dependence was never assessed")


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


def _source(metadata: pd.DataFrame) -> str:
    """Which column set holds the outcome; the two sources are never combined."""
    followups = [c for c in schema.FOLLOWUP_COLUMNS if c in metadata]
    if followups and RESPONSE in metadata:
        raise ValueError(f"both {RESPONSE!r} and follow-up columns ({', '.join(followups)}) "
                         "are present; the label is ambiguous, keep one")
    if followups:
        return "followup"
    if RESPONSE in metadata:
        return RESPONSE
    raise ValueError(f"no outcome: need {FOLLOWUP_PLATELETS} and {FOLLOWUP_BLEEDING}, "
                     f"or a {RESPONSE!r} column")


def response_labels(metadata: pd.DataFrame, definition: str = "iwg") -> pd.Series:
    """CR/R/NR per sample, derived from follow-up columns or taken from `response`.

    A precomputed `response` is the lab's own scoring and cannot be re-derived, so
    `definition` does not change it; the two sources are never combined. Every sample gets a
    label: use derive_outcomes to leave out episodes that cannot show a response.
    """
    _check_name(definition, DEFINITIONS, "definition")
    if _source(metadata) == RESPONSE:
        return _given(metadata)
    labels, unassessed, _ = _scored(metadata, definition)
    _refuse_unassessed(metadata, unassessed)
    return labels


def _check_windows(windows: Mapping[str, tuple[int, int]]) -> dict[str, tuple[float, float]]:
    """A misspelt treatment would silently switch its check off, so names are validated."""
    checked = {}
    for name, window in windows.items():
        _check_name(name, schema.TREATMENTS, "treatment in windows")
        try:
            first, last = (float(day) for day in window)
        except (TypeError, ValueError):
            raise ValueError(f"window for {name!r} must be (first_day, last_day), "
                             f"got {window!r}") from None
        if not 0 <= first <= last:
            raise ValueError(f"window for {name!r} must satisfy 0 <= first_day <= last_day, "
                             f"got {first:g}-{last:g}")
        checked[name] = (first, last)
    return checked


_check_windows(DEFAULT_WINDOWS)  # a renamed treatment fails at import


def _baseline_reasons(metadata: pd.DataFrame, definition: str) -> list[str | None]:
    """A baseline already at the response count makes any follow-up count meaningless."""
    if BASELINE_PLATELETS not in metadata:
        return [None] * len(metadata)
    baseline = _numbers(metadata[BASELINE_PLATELETS], BASELINE_PLATELETS)
    ceiling = BASELINE_CEILINGS[definition]
    return [f"{BASELINE_PLATELETS} {value:g} is at or above {ceiling:g}, which already counts "
            f"as a response under {definition!r}, so no response can be shown"
            if value >= ceiling else None for value in baseline]


def _treatments(metadata: pd.DataFrame) -> list[str | None]:
    if TREATMENT not in metadata:
        return [None] * len(metadata)
    return [value.strip().lower() if isinstance(value, str) else None
            for value in metadata[TREATMENT]]


def _window_reason(treatment: str | None, day: float,
                   windows: Mapping[str, tuple[float, float]]) -> str | None:
    window = windows.get(treatment) if treatment is not None else None
    if window is None or np.isnan(day) or window[0] <= day <= window[1]:
        return None
    return (f"{FOLLOWUP_DAY} {day:g} outside the {treatment} response window "
            f"{window[0]:g}-{window[1]:g} days")


def _window_reasons(metadata: pd.DataFrame, windows: Mapping[str, tuple[float, float]]
                    ) -> tuple[list[str | None], np.ndarray]:
    """Out-of-window reasons, and which windowed episodes have no day to check."""
    days = (_numbers(metadata[FOLLOWUP_DAY], FOLLOWUP_DAY) if FOLLOWUP_DAY in metadata
            else np.full(len(metadata), np.nan))
    pairs = list(zip(_treatments(metadata), days, strict=True))
    reasons = [_window_reason(t, d, windows) for t, d in pairs]
    unchecked = np.array([t in windows and np.isnan(d) for t, d in pairs], dtype=bool)
    return reasons, unchecked


def derive_outcomes(metadata: pd.DataFrame, definition: str = "iwg",
                    windows: Mapping[str, tuple[int, int]] | None = None) -> Outcomes:
    """Labels for the episodes that can show a response; the rest excluded with a reason.

    Excluded (not an error): a baseline_platelets at or above the definition's response count
    (BASELINE_CEILINGS), or a followup_day outside the treatment's window (`windows`, None
    means DEFAULT_WINDOWS, {} switches the check off). Each check runs when its column is
    present: a precomputed `response` gets the baseline check under `definition`, never the
    window check (followup_day beside `response` is ambiguous). An empty steroid_dependent on
    a corticosteroid episode that would score CR/R is an error.
    """
    _check_name(definition, DEFINITIONS, "definition")
    checked = _check_windows(DEFAULT_WINDOWS if windows is None else windows)
    if _source(metadata) == RESPONSE:
        labels = _given(metadata)
        unassessed = assumed = np.zeros(len(metadata), dtype=bool)
        checked = {}  # the lab assessed the response; there is no follow-up day to check
    else:
        labels, unassessed, assumed = _scored(metadata, definition)
    window_reasons, unchecked = _window_reasons(metadata, checked)
    reasons = ["; ".join(r for r in pair if r) or None
               for pair in zip(_baseline_reasons(metadata, definition), window_reasons,
                               strict=True)]
    excluded = np.array([reason is not None for reason in reasons], dtype=bool)
    _refuse_unassessed(metadata, unassessed & ~excluded)
    return Outcomes(
        labels=labels[~excluded],
        excluded=pd.DataFrame({REASON: [r for r in reasons if r is not None]},
                              index=metadata.index[excluded], dtype=object),
        unchecked=metadata.index[unchecked & ~excluded],
        assumed=metadata.index[assumed & ~excluded],
    )


def without_rare_treatments(outcomes: Outcomes, metadata: pd.DataFrame, n_splits: int,
                            inner_splits: int = 0) -> Outcomes:
    """Episodes of treatments with too few patients for (nested) CV, moved to the excluded.

    Such a treatment cannot be in every training fold, so a fold would be scored on a
    treatment its model never saw, and a handful of patients cannot teach its response.
    The bound is `evaluation.check_cohort_size`'s: every outer and inner fold.
    """
    treatment = metadata.loc[outcomes.labels.index, schema.TREATMENT]
    patients = metadata.loc[outcomes.labels.index].groupby(treatment)[schema.SUBJECT_ID].nunique()
    need = n_splits
    if inner_splits:
        need = max(need, -(-inner_splits * n_splits // (n_splits - 1)))
    rare = patients[patients < need]
    return _exclude(outcomes, treatment, rare.index, lambda t: (
        f"treatment {t!r} has only {rare[t]} patient(s), fewer than the {need} that "
        f"{n_splits}-fold CV needs: too few to learn or to validate its response"))


def without_unknown_treatments(outcomes: Outcomes, metadata: pd.DataFrame,
                               known: Sequence[str]) -> Outcomes:
    """Episodes of treatments a model never saw, moved to the excluded: it cannot speak
    for them, and scoring them as its reference treatment would misstate its validity."""
    treatment = metadata.loc[outcomes.labels.index, schema.TREATMENT]
    unknown = sorted(set(treatment) - set(known))
    return _exclude(outcomes, treatment, unknown, lambda t: (
        f"treatment {t!r} was not in the model's training data (it knows {', '.join(known)})"))


def _exclude(outcomes: Outcomes, treatment: pd.Series, treatments: Sequence[str],
             reason: Callable[[str], str]) -> Outcomes:
    mask = treatment.isin(treatments)
    if not mask.any():
        return outcomes
    reasons = pd.DataFrame({REASON: [reason(t) for t in treatment[mask]]},
                           index=treatment.index[mask])
    return replace(outcomes, labels=outcomes.labels[~mask],
                   excluded=pd.concat([outcomes.excluded, reasons]))


def target(responses: pd.Series, target: str = "responded") -> pd.Series:
    """CR/R/NR -> 0/1: `responded` counts CR and R, `complete` only CR."""
    _check_name(target, TARGETS, "target")
    unknown = ~responses.isin(schema.RESPONSES)
    if unknown.any():
        sample = responses.index[unknown][0]
        raise ValueError(f"response of sample {sample!r} is {responses[sample]!r}; expected "
                         f"one of: {', '.join(schema.RESPONSES)}")
    return responses.isin(POSITIVE[target]).astype("int64").rename(target)
