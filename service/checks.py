"""Checks a model must pass before it serves, whether loaded at start-up or swapped in.

A registry alias can move to any version at any time; the service swaps only to a model
that answers the API it already promised, and answers it the way training said it would:

- **compatible**: everything the model reads is something the API accepts (its treatments
  are in the request schema's `treatment` enum, its clinical features derive from the
  `clinical` fields, which are fixed at start-up). Only that is checked, so the verdict is
  the same on every replica whatever it served before, and moving the alias back (the
  rollback) is never refused. A model that answers fewer treatments than the one it
  replaces, or another response definition or target, is accepted with a warning (in
  `checks` of /v1/model and a log line): requests for a dropped treatment get a 422.
- **golden**: the synthetic patients recorded at training (`training.golden`) pass the
  request schema (its fields, types and enums; the size limits bound a request's cost, not
  what a model needs, so they are lifted here), and re-scored through the compiled path
  they get the probabilities training's pipeline gave, to `PROBABILITY_TOLERANCE`, and the
  same SHAP values, to `SHAP_TOLERANCE` (float32 precision of XGBoost's trees).
- **additive**: on the golden patients, base value + sum of SHAP values = the log-odds of
  the served probability.

Models trained before golden predictions existed, or on a cohort too small to aggregate
(`training.golden.MIN_GROUP`), have none: they pass with the golden and additivity checks
reported as "skipped".
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from scipy.special import logit

from service.schemas import Clinical, Limits, request_models
from training.golden import FORMAT, GOLDEN_KEY
from training.schema import TREATMENTS

if TYPE_CHECKING:
    from service.model import LoadedModel

PROBABILITY_TOLERANCE = 1e-9
SHAP_TOLERANCE = 1e-5
DERIVED = ("sex=male", "bleeding_severity")  # computed from sex, bleeding_score and scale
UNLIMITED = Limits(max_batch=100_000, max_taxa=1_000_000, max_key_length=100_000)


class CandidateRejected(RuntimeError):
    """A model that loaded but must not serve: the reason says why, `check` which check
    (compatible, golden, additive) refused it."""

    def __init__(self, reason: str, check: str = "golden") -> None:
        super().__init__(reason)
        self.check = check


def check(candidate: LoadedModel, serving: LoadedModel | None) -> dict[str, str]:
    """Run every check; raise `CandidateRejected` on the first that fails, else return what
    each came to ("passed", "passed, with a warning: ..." or "skipped: why")."""
    compatible(candidate)
    changes = changed_answers(candidate, serving)
    verdict = f"passed, with a warning: {'; '.join(changes)}" if changes else "passed"
    golden = candidate.stored.metadata.get(GOLDEN_KEY)
    if not golden:
        skipped = "skipped: the model records no golden predictions"
        return {"compatible": verdict, "golden": skipped, "additive": skipped}
    if golden.get("format") != FORMAT:
        raise CandidateRejected(f"golden predictions in an unknown format "
                                f"{golden.get('format')!r}")
    reproduce(candidate, golden)
    return {"compatible": verdict, "golden": "passed", "additive": "passed"}


def compatible(candidate: LoadedModel) -> None:
    """Against the API's request schema only: what the model reads must be what the API
    accepts. Intrinsic to the version, so a refusal holds on every replica, forever."""
    unknown = sorted(set(candidate.treatments) - set(TREATMENTS))
    if unknown:
        raise CandidateRejected(f"incompatible: the model scores treatments the API does not "
                                f"accept: {', '.join(unknown)}", "compatible")
    fields = set(Clinical.model_fields)
    encoder = candidate.stored.model.pipeline_.named_steps["features"].named_transformers_[
        "clinical"]
    needed = [str(name) for name in encoder.get_feature_names_out()
              if not str(name).startswith(("treatment=", "phase=")) and str(name) not in DERIVED]
    missing = sorted(set(needed) - fields)
    if missing:
        raise CandidateRejected(f"incompatible: the model reads clinical fields the API does "
                                f"not accept: {', '.join(missing)}", "compatible")


def changed_answers(candidate: LoadedModel, serving: LoadedModel | None) -> list[str]:
    """How the candidate answers differently from the model it replaces: worth a warning
    (clients see it), never a refusal (a rollback is exactly such a change)."""
    if serving is None:
        return []
    changes = []
    dropped = sorted(set(serving.treatments) - set(candidate.treatments))
    if dropped:
        changes.append(f"it does not answer treatments the replaced model (version "
                       f"{serving.stored.version}) answered: {', '.join(dropped)}; requests "
                       f"for them get 422")
    for key in ("definition", "target"):
        ours, theirs = serving.stored.metadata.get(key), candidate.stored.metadata.get(key)
        if ours is not None and theirs is not None and ours != theirs:
            changes.append(f"response {key} {theirs!r}, the replaced model's was {ours!r}")
    return changes


def reproduce(candidate: LoadedModel, golden: dict[str, Any]) -> None:
    """Golden patients through the request schema and the compiled path, against training."""
    _, patient_model, _ = request_models(UNLIMITED)
    try:
        patients = [patient_model.model_validate(p) for p in golden["patients"]]
        expected = np.asarray(golden["probability"], dtype=np.float64)
        recorded = [dict(row) for row in golden["shap"]]
        base = float(golden["base_value"])
    except (KeyError, TypeError, ValueError) as error:  # pydantic's errors are ValueErrors
        raise CandidateRejected(f"golden predictions unreadable or refused by the request "
                                f"schema ({type(error).__name__})") from None
    if not len(patients) == len(expected) == len(recorded):
        raise CandidateRejected("golden predictions: patients and results do not pair up")
    scored = candidate.compiled.score(patients, True)
    gap = float(np.max(np.abs(scored.probability - expected)))
    if not gap <= PROBABILITY_TOLERANCE:
        raise CandidateRejected(f"golden predictions not reproduced: probabilities differ by "
                                f"up to {gap:.3g} (tolerance {PROBABILITY_TOLERANCE:g})")
    explanation = scored.explanation
    names = [str(n) for n in explanation.feature_names]
    unknown = sorted({name for row in recorded for name in row} - set(names))
    if unknown:
        raise CandidateRejected(f"golden SHAP values name {len(unknown)} features the model "
                                f"does not report")
    wanted = np.array([[row.get(name, 0.0) for name in names] for row in recorded],
                      dtype=np.float64)
    gap = max(float(np.max(np.abs(explanation.shap_values - wanted), initial=0.0)),
              abs(explanation.base_value - base))
    if not gap <= SHAP_TOLERANCE:
        raise CandidateRejected(f"golden SHAP values not reproduced: differ by up to "
                                f"{gap:.3g} (tolerance {SHAP_TOLERANCE:g})")
    served = logit(np.clip(scored.probability, 1e-300, 1 - 1e-16))
    gap = float(np.max(np.abs(explanation.log_odds - served)))
    if not gap <= SHAP_TOLERANCE:
        raise CandidateRejected(f"SHAP not additive on the golden patients: base + sum of "
                                f"SHAP misses the served log-odds by {gap:.3g}", "additive")
