"""IWG response label: hand-checked edge cases (Rodeghiero 2009 and the two named variants)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from training import schema
from training.outcomes import (
    DEFAULT_WINDOWS,
    DEFINITIONS,
    TARGETS,
    Outcomes,
    classify,
    derive_outcomes,
    response_labels,
    target,
    without_rare_treatments,
    without_unknown_treatments,
)

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
    frame = _followup_frame(treatment=["corticosteroid", "ivig", "corticosteroid"],
                            steroid_dependent=[1.0, np.nan, 0.0])
    assert response_labels(frame).tolist() == ["NR", "R", "NR"]


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


# ------------------------------------------------------- derive_outcomes: exclusions and checks


def _episode(treatment: str = "corticosteroid", baseline: float = 10.0,
             followup: float = 120.0, day: float | None = 14.0, **extra: object
             ) -> pd.DataFrame:
    """One typed episode (as load_cohort returns it), sample id 'e1'."""
    row: dict[str, object] = {
        "treatment": treatment, "baseline_platelets": baseline, "followup_platelets": followup,
        "followup_day": np.nan if day is None else day, "followup_bleeding": 0.0, **extra}
    return pd.DataFrame([row], index=pd.Index(["e1"], name=schema.SAMPLE_ID))


def test_derive_outcomes_keeps_valid_episodes() -> None:
    frame = _followup_frame(treatment=["corticosteroid", "ivig", "tpo_ra"])
    frame.loc["c", "followup_day"] = 30.0  # inside tpo_ra 7-90
    result = derive_outcomes(frame)
    assert isinstance(result, Outcomes)
    pd.testing.assert_series_equal(result.labels, response_labels(frame))
    assert result.excluded.empty
    assert list(result.excluded.columns) == ["reason"]
    assert result.unchecked_window == 1  # 'b' has no followup_day


def test_missing_dependence_on_steroid_responder_is_an_error() -> None:
    frame = pd.concat([_episode(steroid_dependent=np.nan).rename(index={"e1": "s1"}),
                       _episode(steroid_dependent=0.0).rename(index={"e1": "s2"}),
                       _episode(steroid_dependent=np.nan).rename(index={"e1": "s3"})])
    message = r"steroid_dependent is empty for 2 .*: s1, s3; fill it with yes or no, or drop"
    with pytest.raises(ValueError, match=message):
        derive_outcomes(frame)
    with pytest.raises(ValueError, match=message):
        response_labels(frame)


def test_missing_dependence_on_steroid_non_responder_is_fine() -> None:
    frame = _episode(followup=20.0, steroid_dependent=np.nan)  # NR whatever the dependence
    assert derive_outcomes(frame).labels.tolist() == ["NR"]


@pytest.mark.parametrize("treatment", ["ivig", "tpo_ra"])
def test_missing_dependence_on_non_steroid_episode_is_fine(treatment: str) -> None:
    frame = _episode(treatment, day=7.0, steroid_dependent=np.nan)
    assert derive_outcomes(frame).labels.tolist() == ["CR"]
    assert response_labels(frame).tolist() == ["CR"]


def test_missing_dependence_without_treatment_column_is_an_error() -> None:
    frame = _followup_frame(steroid_dependent=[0.0, np.nan, 0.0])  # 'b' scores R
    with pytest.raises(ValueError, match=r"for 1 .*: b \(there is no 'treatment' column"):
        response_labels(frame)


def test_absent_dependence_column_means_not_dependent_and_says_so() -> None:
    frame = pd.concat([_episode().rename(index={"e1": "s1"}),
                       _episode(followup=20.0).rename(index={"e1": "s2"}),  # NR anyway
                       _episode("ivig", day=7.0).rename(index={"e1": "s3"})])
    assert "steroid_dependent" not in frame
    result = derive_outcomes(frame)
    assert result.labels.tolist() == ["CR", "NR", "CR"]
    assert response_labels(frame).tolist() == ["CR", "NR", "CR"]
    # only the steroid responder's label rests on the assumption, and the run is told
    assert result.dependence_assumed == 1
    (warning,) = [w for w in result.warnings() if "steroid_dependent" in w]
    assert warning.startswith("no steroid_dependent column: 1 corticosteroid episode(s)")
    present = derive_outcomes(frame.assign(steroid_dependent=0.0))
    assert present.dependence_assumed == 0 and not present.warnings()
    # an episode excluded later (here: a treatment the model never saw) no longer counts
    dropped = without_unknown_treatments(result, frame, ["ivig"])
    assert dropped.dependence_assumed == 0 and not dropped.warnings()


def test_dependence_given_as_yes_no_text() -> None:
    frame = _episode(steroid_dependent="yes")
    assert derive_outcomes(frame).labels.tolist() == ["NR"]


@pytest.mark.parametrize(("definition", "threshold"), [("ge50", "50"), ("iwg_or", "30")])
def test_baseline_at_response_count_is_excluded(definition: str, threshold: str) -> None:
    result = derive_outcomes(_episode(baseline=60.0, followup=55.0), definition)
    assert result.labels.empty
    assert result.excluded.index.tolist() == ["e1"]
    reason = result.excluded.loc["e1", "reason"]
    assert f"baseline_platelets 60 is at or above {threshold}," in reason
    assert repr(definition) in reason


def test_baseline_below_iwg_ceiling_is_scored() -> None:
    result = derive_outcomes(_episode(baseline=60.0, followup=55.0), "iwg")
    assert result.labels.tolist() == ["NR"]  # 55 is neither >= 100 nor a 2-fold rise
    assert result.excluded.empty


def test_baseline_100_is_excluded_under_iwg() -> None:
    result = derive_outcomes(_episode(baseline=100.0, followup=100.0), "iwg")
    assert result.labels.empty
    assert "baseline_platelets 100 is at or above 100," in result.excluded.loc["e1", "reason"]


def test_baseline_just_under_ceiling_is_kept() -> None:
    result = derive_outcomes(_episode(baseline=49.9, followup=55.0), "ge50")
    assert result.labels.tolist() == ["R"]


def test_followup_day_outside_window_is_excluded() -> None:
    result = derive_outcomes(_episode(day=3650.0))
    assert result.labels.empty
    assert result.excluded.loc["e1", "reason"] == (
        "followup_day 3650 outside the corticosteroid response window 7-30 days")


@pytest.mark.parametrize("day", [7.0, 28.0, 30.0])
def test_followup_day_inside_window_is_kept(day: float) -> None:
    result = derive_outcomes(_episode(day=day))
    assert result.labels.tolist() == ["CR"]
    assert result.excluded.empty
    assert result.unchecked_window == 0


def test_missing_followup_day_is_counted_not_excluded() -> None:
    result = derive_outcomes(_episode(day=None))
    assert result.labels.tolist() == ["CR"]
    assert result.unchecked_window == 1


def test_both_reasons_are_reported() -> None:
    result = derive_outcomes(_episode(baseline=120.0, followup=150.0, day=365.0))
    reason = result.excluded.loc["e1", "reason"]
    assert "baseline_platelets 120" in reason and "followup_day 365" in reason
    assert result.unchecked_window == 0


def test_custom_windows_override_defaults() -> None:
    frame = _episode(day=60.0)
    assert not derive_outcomes(frame).excluded.empty  # outside the default 7-30
    result = derive_outcomes(frame, windows={"corticosteroid": (7, 90)})
    assert result.labels.tolist() == ["CR"]
    narrow = derive_outcomes(_episode(day=14.0), windows={"corticosteroid": (21, 28)})
    assert narrow.excluded.loc["e1", "reason"].endswith("window 21-28 days")


def test_treatment_missing_from_windows_is_not_checked() -> None:
    result = derive_outcomes(_episode(day=3650.0, treatment="ivig"),
                             windows={"corticosteroid": (7, 30)})
    assert result.labels.tolist() == ["CR"]
    assert result.unchecked_window == 0


def test_empty_windows_disable_the_check() -> None:
    result = derive_outcomes(_episode(day=3650.0), windows={})
    assert result.labels.tolist() == ["CR"]
    assert result.excluded.empty
    assert derive_outcomes(_episode(day=None), windows={}).unchecked_window == 0


@pytest.mark.parametrize(("windows", "message"), [
    ({"steroids": (7, 30)}, "unknown treatment in windows 'steroids'"),
    ({"ivig": (14, 1)}, "0 <= first_day <= last_day, got 14-1"),
    ({"ivig": 14}, "must be \\(first_day, last_day\\)"),
])
def test_bad_windows_are_refused(windows: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        derive_outcomes(_episode(), windows=windows)  # type: ignore[arg-type]


def test_default_windows_cover_every_treatment() -> None:
    assert set(DEFAULT_WINDOWS) == set(schema.TREATMENTS)
    assert DEFAULT_WINDOWS["corticosteroid"] == (7, 30)


def test_precomputed_response_gets_the_checks_its_columns_allow() -> None:
    frame = pd.DataFrame(
        {"treatment": ["corticosteroid", "ivig", "ivig"],
         "baseline_platelets": [10.0, 150.0, 20.0], "response": ["CR", "CR", "R"]},
        index=pd.Index(["a", "b", "c"], name=schema.SAMPLE_ID))
    result = derive_outcomes(frame)
    assert result.labels.tolist() == ["CR", "R"]
    assert result.excluded.index.tolist() == ["b"]
    assert result.unchecked_window == 0  # a given response has no window to check
    bare = derive_outcomes(frame[["response"]])
    assert bare.labels.tolist() == ["CR", "CR", "R"]
    assert bare.excluded.empty and bare.unchecked_window == 0


def test_derive_outcomes_keeps_the_source_rules() -> None:
    with pytest.raises(ValueError, match="ambiguous"):
        derive_outcomes(_followup_frame(response=["CR", "R", "NR"]))
    with pytest.raises(ValueError, match="unknown definition 'who'"):
        derive_outcomes(_episode(), "who")
    with pytest.raises(ValueError, match="followup_bleeding is missing for 1 sample\\(s\\): e1"):
        derive_outcomes(_episode(followup_bleeding=np.nan))


def test_treatments_with_fewer_patients_than_folds_are_excluded_with_a_reason() -> None:
    """A treatment that cannot sit in every training fold is set aside, not left to fail a
    fold (or to be scored by a model that never saw it)."""
    treatments = ["ivig"] * 6 + ["tpo_ra"] * 6 + ["splenectomy"] * 2
    metadata = pd.DataFrame({
        schema.SUBJECT_ID: [f"P{i}" for i in range(12)] + ["P20", "P20"],
        schema.TREATMENT: treatments},
        index=pd.Index([f"S{i}" for i in range(14)], name=schema.SAMPLE_ID))
    outcomes = Outcomes(labels=pd.Series(["R", "NR"] * 7, index=metadata.index),
                        excluded=pd.DataFrame({"reason": []}, index=pd.Index([], dtype=object)))
    kept = without_rare_treatments(outcomes, metadata, n_splits=5)
    assert list(kept.labels.index) == [f"S{i}" for i in range(12)]
    assert list(kept.excluded.index) == ["S12", "S13"]
    assert "'splenectomy' has only 1 patient(s), fewer than the 5 that 5-fold CV needs" in \
        kept.excluded.loc["S12", "reason"]
    nested = without_rare_treatments(outcomes, metadata, n_splits=5, inner_splits=5)
    assert len(nested.labels) == 0  # 6 patients < 7: 5 inner folds in 4/5 of them
    assert without_rare_treatments(outcomes, metadata, n_splits=1) is outcomes


def test_treatments_a_model_never_saw_are_excluded_with_a_reason() -> None:
    metadata = pd.DataFrame({schema.TREATMENT: ["ivig", "rituximab", "ivig", "splenectomy"]},
                            index=pd.Index(["a", "b", "c", "d"], name=schema.SAMPLE_ID))
    outcomes = Outcomes(labels=pd.Series(["R", "NR", "CR", "R"], index=metadata.index),
                        excluded=pd.DataFrame({"reason": []}, index=pd.Index([], dtype=object)))
    kept = without_unknown_treatments(outcomes, metadata, ["corticosteroid", "ivig"])
    assert list(kept.labels.index) == ["a", "c"]
    assert kept.excluded.loc["b", "reason"] == (
        "treatment 'rituximab' was not in the model's training data (it knows "
        "corticosteroid, ivig)")
    assert without_unknown_treatments(outcomes, metadata, schema.TREATMENTS) is outcomes
