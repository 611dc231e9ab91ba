"""IWG response label: hand-checked edge cases (Rodeghiero 2009 and the two named variants)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from training import schema
from training.outcomes import DEFINITIONS, TARGETS, classify, response_labels, target

# (definition, followup, baseline, followup_bleeding, steroid_dependent, expected)
EDGE_CASES = [
    # exactly 30 with exactly a 2-fold rise: both thresholds are inclusive
    ("iwg", 30, 15, 0, None, "R"),
    # 29.9 with a 2-fold rise: just under 30
    ("iwg", 29.9, 14.95, 0, None, "NR"),
    # exactly 2-fold above 30
    ("iwg", 40, 20, 0, None, "R"),
    # just under 2-fold above 30
    ("iwg", 39.9, 20, 0, None, "NR"),
    # 100 without bleeding is CR even without a 2-fold rise
    ("iwg", 100, 90, 0, None, "CR"),
    # 99.9 with a big rise is R, not CR
    ("iwg", 99.9, 10, 0, None, "R"),
    # 100 with bleeding
    ("iwg", 100, 10, 1, None, "NR"),
    # very high count with bleeding
    ("iwg", 450, 5, 1, None, "NR"),
    # >= 30 but < 2-fold: NR under iwg ...
    ("iwg", 45, 30, 0, None, "NR"),
    # ... R under iwg_or (30 suffices)
    ("iwg_or", 45, 30, 0, None, "R"),
    # < 30 but >= 2-fold: NR under iwg ...
    ("iwg", 20, 10, 0, None, "NR"),
    # ... R under iwg_or (the rise suffices)
    ("iwg_or", 20, 10, 0, None, "R"),
    # iwg_or still needs no bleeding
    ("iwg_or", 45, 30, 1, None, "NR"),
    # ge50: exactly 50 is R, no rise needed
    ("ge50", 50, 40, 0, None, "R"),
    # ge50: 49 is NR even with >= 30 and a 5-fold rise
    ("ge50", 49, 9, 0, None, "NR"),
    # ge50: CR as in iwg
    ("ge50", 100, 60, 0, None, "CR"),
    # steroid dependent is NR whatever the count, in every definition
    ("iwg", 150, 10, 0, 1, "NR"),
    ("iwg_or", 150, 10, 0, 1, "NR"),
    ("ge50", 150, 10, 0, 1, "NR"),
    # steroid_dependent missing means not dependent
    ("iwg", 150, 10, 0, np.nan, "CR"),
    # baseline 0: any count >= 30 is a 2-fold rise
    ("iwg", 30, 0, 0, None, "R"),
    # baseline 0 and still 0: no rise at all, never a response
    ("iwg", 0, 0, 0, None, "NR"),
    ("iwg_or", 0, 0, 0, None, "NR"),
    # baseline 0, follow-up 10: iwg needs 30, iwg_or accepts the rise
    ("iwg", 10, 0, 0, None, "NR"),
    ("iwg_or", 10, 0, 0, None, "R"),
]


@pytest.mark.parametrize(("definition", "followup", "baseline", "bleeding", "dependent",
                          "expected"), EDGE_CASES)
def test_classify_edge_cases(definition: str, followup: float, baseline: float, bleeding: int,
                             dependent: float | None, expected: str) -> None:
    steroid = None if dependent is None else [dependent]
    result = classify([followup], [baseline], [bleeding], steroid, definition)
    assert result.tolist() == [expected]


def test_classify_is_vectorised_and_accepts_yes_no() -> None:
    result = classify(np.array([30, 100, 10]), 15, ["no", "No", "YES"], ["no", None, "no"])
    assert result.tolist() == ["R", "CR", "NR"]


@pytest.mark.parametrize("definition", ["IWG", "iwg-or", ""])
def test_unknown_definition_lists_valid_names(definition: str) -> None:
    with pytest.raises(ValueError, match="iwg, iwg_or, ge50"):
        classify([50], [10], [0], definition=definition)


def test_classify_refuses_missing_values() -> None:
    with pytest.raises(ValueError, match="followup_bleeding is missing at positions \\[1\\]"):
        classify([50, 60], [10, 10], [0, np.nan])
    with pytest.raises(ValueError, match="followup_platelets"):
        classify([np.nan], [10], [0])


def test_classify_rejects_non_boolean_bleeding() -> None:
    with pytest.raises(ValueError, match="followup_bleeding"):
        classify([50], [10], ["maybe"])


def _followup_frame(**extra: list[object]) -> pd.DataFrame:
    frame = pd.DataFrame(
        {
            "baseline_platelets": [10.0, 20.0, 5.0],
            "followup_platelets": [120.0, 45.0, 25.0],
            "followup_day": [28.0, np.nan, 14.0],  # a missing day is allowed
            "followup_bleeding": [0.0, 0.0, 0.0],
            **extra,
        },
        index=pd.Index(["a", "b", "c"], name=schema.SAMPLE_ID),
    )
    return frame


@pytest.mark.parametrize(("definition", "expected"), [
    ("iwg", ["CR", "R", "NR"]),  # 45 from 20 is 2.25-fold; 25 is under 30
    ("iwg_or", ["CR", "R", "R"]),  # 25 from 5 is a 5-fold rise
    ("ge50", ["CR", "NR", "NR"]),  # 45 and 25 are under 50
])
def test_response_labels_from_followup(definition: str, expected: list[str]) -> None:
    labels = response_labels(_followup_frame(), definition)
    assert labels.tolist() == expected
    assert labels.index.tolist() == ["a", "b", "c"]
    assert labels.name == "response"


def test_response_labels_steroid_dependence_makes_nr() -> None:
    labels = response_labels(_followup_frame(steroid_dependent=[1.0, np.nan, 0.0]))
    assert labels.tolist() == ["NR", "R", "NR"]


@pytest.mark.parametrize("column", ["followup_platelets", "followup_bleeding"])
def test_response_labels_missing_value_names_sample(column: str) -> None:
    frame = _followup_frame()
    frame.loc["b", column] = np.nan
    with pytest.raises(ValueError, match=f"{column} is missing for 1 sample\\(s\\): b"):
        response_labels(frame)


def test_response_labels_missing_column() -> None:
    frame = _followup_frame().drop(columns="followup_bleeding")
    with pytest.raises(ValueError, match="column\\(s\\) missing: followup_bleeding"):
        response_labels(frame)


def test_precomputed_response_is_used_as_given() -> None:
    frame = pd.DataFrame({"baseline_platelets": [10.0, 20.0], "response": ["NR", "CR"]},
                         index=pd.Index(["a", "b"], name=schema.SAMPLE_ID))
    labels = response_labels(frame)
    assert labels.tolist() == ["NR", "CR"]
    assert labels.name == "response"


@pytest.mark.parametrize(("values", "message"), [
    (["CR", None], "response is missing for 1 sample\\(s\\): b"),
    (["CR", "PR"], "sample 'b' is 'PR'; expected one of: CR, R, NR"),
])
def test_precomputed_response_errors(values: list[str | None], message: str) -> None:
    frame = pd.DataFrame({"response": values}, index=pd.Index(["a", "b"]))
    with pytest.raises(ValueError, match=message):
        response_labels(frame)


def test_both_label_sources_are_ambiguous() -> None:
    frame = _followup_frame(response=["CR", "R", "NR"])
    with pytest.raises(ValueError, match="ambiguous"):
        response_labels(frame)


def test_no_outcome_is_an_error() -> None:
    with pytest.raises(ValueError, match="no outcome"):
        response_labels(pd.DataFrame({"baseline_platelets": [10.0]}))


def test_response_labels_checks_definition_name() -> None:
    with pytest.raises(ValueError, match="unknown definition 'who'"):
        response_labels(_followup_frame(), "who")


@pytest.mark.parametrize(("name", "expected"), [
    ("responded", [1, 1, 0]),  # CR and R count as response
    ("complete", [1, 0, 0]),  # only CR
])
def test_target_mapping(name: str, expected: list[int]) -> None:
    responses = pd.Series(["CR", "R", "NR"], index=["a", "b", "c"])
    result = target(responses, name)
    assert result.tolist() == expected
    assert result.dtype == np.int64
    assert result.index.tolist() == ["a", "b", "c"]


def test_target_default_is_responded() -> None:
    assert target(pd.Series(["R"])).tolist() == [1]
    assert TARGETS[0] == "responded"
    assert DEFINITIONS[0] == "iwg"


def test_target_errors() -> None:
    with pytest.raises(ValueError, match="responded, complete"):
        target(pd.Series(["CR"]), "partial")
    with pytest.raises(ValueError, match="'x' is 'maybe'"):
        target(pd.Series(["CR", "maybe"], index=["a", "x"]))
