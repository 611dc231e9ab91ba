"""Request and response models: the public REST contract, documented in the OpenAPI page.

The `clinical` object is generated from `training.schema.CLINICAL_FIELDS`, so the API,
the cohort format and the model can never disagree on a field's name, type or unit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    create_model,
    field_validator,
    model_validator,
)

from training import schema
from training.schema import CLINICAL_FIELDS, TREATMENTS, Kind

Treatment = Literal[TREATMENTS]  # type: ignore[valid-type]


def _clinical_field(field: schema.Field) -> tuple[Any, Any]:
    unit = f" Unit: {field.unit}." if field.unit else ""
    example = field.example
    extra = {"unit": field.unit} if field.unit else None
    info: dict[str, Any] = {"description": field.description + unit, "examples": [example],
                            "json_schema_extra": extra}
    if field.kind == Kind.NUMBER:
        kind: Any = float
        info |= {"ge": field.minimum, "le": field.maximum}
    elif field.kind == Kind.BOOLEAN:
        kind = bool
    elif field.kind == Kind.CATEGORY:
        kind = Literal[field.categories]  # type: ignore[valid-type]
    else:
        kind = str
    if field.name == "baseline_platelets":  # required in cohorts, so required here
        return kind, Field(..., **info)
    return kind | None, Field(None, **info)


# Strict: a number is a JSON number (never true/false or "12"), a boolean is true/false,
# and every number is finite (no NaN, Infinity or 1e400).
STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class _ClinicalBase(BaseModel):
    model_config = STRICT

    @field_validator("bleeding_score", mode="before", check_fields=False)
    @classmethod
    def _score_as_text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int | float) and not isinstance(value, bool) \
            else value

    @model_validator(mode="after")
    def _bleeding_parses(self) -> _ClinicalBase:
        try:
            schema.bleeding_severity(getattr(self, "bleeding_score", None),
                                     getattr(self, "bleeding_scale", None))
        except ValueError as error:  # the message without the value that was sent
            raise ValueError(str(error).split(", got ", 1)[0]) from None
        return self


Clinical = create_model(
    "Clinical",
    __base__=_ClinicalBase,
    __doc__="Clinical and immune data at the start of treatment; absent fields are missing.",
    **{f.name: _clinical_field(f) for f in CLINICAL_FIELDS},
)

EXAMPLE_COUNTS = {
    "d__Bacteria;p__Firmicutes;c__Clostridia;o__Oscillospirales;"
    "f__Ruminococcaceae;g__Faecalibacterium;s__Faecalibacterium_prausnitzii": 1250,
    "d__Bacteria;p__Bacteroidota;c__Bacteroidia;o__Bacteroidales;"
    "f__Bacteroidaceae;g__Bacteroides;s__Bacteroides_ovatus": 3400,
}
EXAMPLE_PATIENT = {
    "patient_id": "P1", "treatment": "corticosteroid",
    "clinical": {"baseline_platelets": 18, "age_years": 46, "sex": "female"},
    "microbiome": {"counts": EXAMPLE_COUNTS},
}


MAX_READS = 1e12  # per taxon: beyond any sequencing run, and 5000 of them sum finitely


@dataclass(frozen=True)
class Limits:
    """Request limits (settings), written into the request schema so the OpenAPI page says
    exactly what is accepted."""

    max_batch: int = 1000
    max_taxa: int = 5000
    max_key_length: int = 1000


@lru_cache(maxsize=8)
def request_models(limits: Limits) -> tuple[type[BaseModel], type[BaseModel], type[BaseModel]]:
    """(Microbiome, Patient, PredictRequest) under `limits`."""
    taxon = Annotated[str, StringConstraints(pattern=schema.TAXON_PATTERN.pattern,
                                             max_length=limits.max_key_length)]
    reads = Annotated[float, Field(ge=0, le=MAX_READS)]

    def counts_schema(field_schema: dict[str, Any]) -> None:
        """Keys as propertyNames (pydantic writes patternProperties, which would let any
        other key through), and at least one positive value."""
        value = field_schema.pop("patternProperties").popitem()[1]
        field_schema["propertyNames"] = {"pattern": schema.TAXON_PATTERN.pattern,
                                         "maxLength": limits.max_key_length}
        field_schema["additionalProperties"] = value
        field_schema["not"] = {"additionalProperties": {"maximum": 0}}

    class Microbiome(BaseModel):
        model_config = STRICT

        counts: dict[taxon, reads] = Field(  # type: ignore[valid-type]
            ..., min_length=1, max_length=limits.max_taxa,
            description="Reads (or relative abundances) per taxon, keyed by lineage string "
            "(SILVA/GTDB `d__...;g__...` or MetaPhlAn `k__...|g__...`), at any rank down to "
            "species; aggregated to the model's rank. Finite, non-negative, with a finite "
            "positive sum. Taxa the model does not know are reported in `warnings` with "
            "their share of reads.",
            examples=[EXAMPLE_COUNTS], json_schema_extra=counts_schema,
        )

        @field_validator("counts")
        @classmethod
        def _valid_total(cls, counts: dict[str, float]) -> dict[str, float]:
            total = math.fsum(counts.values())
            if not math.isfinite(total):
                raise ValueError("the reads add up to more than a number can hold; send "
                                 "counts or relative abundances of ordinary size")
            if total <= 0:
                raise ValueError("the profile has no reads")
            return counts

    class Patient(BaseModel):
        model_config = STRICT

        patient_id: str = Field(..., min_length=1, max_length=128,
                                description="Caller's reference, echoed back; never logged.",
                                examples=["P1"])
        treatment: Treatment = Field(..., description="Treatment whose response is "
                                     "predicted.", examples=["corticosteroid"])
        clinical: Clinical = Field(..., description="Clinical and immune data.")  # type: ignore[valid-type]
        microbiome: Microbiome

    class PredictRequest(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True,
                                  json_schema_extra={"examples": [
                                      {"patients": [EXAMPLE_PATIENT], "explain": True,
                                       "top_k": 5}]})

        patients: list[Patient] = Field(..., min_length=1, max_length=limits.max_batch,
                                        description="One or more patients, ids unique.")
        explain: bool = Field(True, description="Return SHAP contributions per patient.")
        top_k: int = Field(10, ge=1, le=10000, description="Largest contributions returned; "
                           "the rest are summed in `explanation.other_features`.")

    return Microbiome, Patient, PredictRequest


Microbiome, Patient, PredictRequest = request_models(Limits())


class Contribution(BaseModel):
    feature: str = Field(..., description="Input feature: a taxon lineage (value = CLR of its "
                         "relative abundance), a diversity index, a clinical field or a "
                         "treatment indicator. A field's treatment interactions and "
                         "missing-value indicator are summed into the field.")
    label: str = Field(..., description="Readable name: the genus (or deepest rank) of a "
                       "taxon, a clinical field's clinical name, an indicator as "
                       "'Treatment: IVIG'.",
                       examples=["Bacteroides (genus)", "Thrombopoietin (TPO)"])
    unit: str | None = Field(None, description="Unit of `value`: CLR for taxa (log-ratio to "
                             "the sample's geometric mean; compositional, so a taxon's value "
                             "moves when others change), the clinical unit otherwise.")
    value: float | None = Field(..., description="The feature's value for this patient, in "
                                "its own unit; null when missing.")
    relative_abundance_pct: float | None = Field(None, description="For taxa: share of the "
                                                 "profile's reads, in %.")
    shap: float = Field(..., description="Contribution to the recalibrated log-odds of "
                        "response.")


class OtherFeatures(BaseModel):
    count: int = Field(..., description="Features not listed in `contributions`.")
    shap: float = Field(..., description="Sum of their contributions (log-odds).")


class Explanation(BaseModel):
    space: Literal["log_odds"] = "log_odds"
    base_value: float = Field(..., description="Recalibrated log-odds of response of the "
                              "reference (average training) patient.")
    contributions: list[Contribution] = Field(..., description="The top_k contributions by "
                                              "absolute size, largest first.")
    other_features: OtherFeatures = Field(..., description="base_value + sum(contributions) + "
                                          "other_features.shap = logit(probability).")


class PredictionWarning(BaseModel):
    code: Literal["unknown_taxa", "outside_training_range", "missing_fields", "low_read_depth",
                  "abundance_kind"]
    message: str


class Prediction(BaseModel):
    patient_id: str
    probability: float = Field(..., ge=0, le=1, description="Probability of response "
                               "(CR or R by the model's response definition).")
    label: Literal["responder", "non-responder"]
    explanation: Explanation | None = None
    taxa_matched: float = Field(..., ge=0, le=1, description="Share of the profile's reads "
                                "(or abundance) on taxa the model knows, after taxonomy "
                                "harmonisation; the rest was not used.", examples=[0.97])
    warnings: list[PredictionWarning] = Field(default_factory=list)


class ModelRef(BaseModel):
    """The model that made these predictions (also in the X-Model-* response headers)."""

    name: str = Field(..., description="Registered model name.", examples=["itp-response"])
    version: str | None = Field(..., description="Registry version; null for a bundle not "
                                "exported from the registry.", examples=["3"])
    run_id: str | None = Field(..., description="MLflow run that trained it.")
    alias: str | None = Field(None, description="Registry alias it was served through "
                              "(ITP_MODEL_URI models:/<name>@<alias>), else null.",
                              examples=["champion"])


class PredictResponse(BaseModel):
    model: ModelRef
    threshold: float = Field(..., description="Probability cut-off used for `label`: the "
                             "model's own (chosen in training) unless ITP_THRESHOLD is set.")
    predictions: list[Prediction]


class Recalibration(BaseModel):
    intercept: float = Field(..., description="Served log-odds = intercept + slope x the "
                             "tuned model's log-odds + forest_slope x the stacked random "
                             "forest's (all fitted on out-of-fold predictions).")
    slope: float = Field(..., description="Weight of the tuned model's log-odds; below 1 "
                         "shrinks overconfident predictions.")
    forest_slope: float = Field(0.0, description="Weight of the random forest stacked with "
                                "the tuned model; 0 when it added nothing out of fold.")


class ModelInfo(BaseModel):
    name: str
    version: str | None
    run_id: str | None
    alias: str | None = Field(None, description="Registry alias it was served through "
                              "(models:/<name>@<alias>), else null.")
    sha256: str = Field(..., description="SHA-256 over the model files, as verified.")
    integrity: str = Field(..., description="What the digest was checked against: registry "
                           "(the version's tag), signed, pinned (ITP_MODEL_SHA256), or "
                           "self-attested (a bundle's own record only).")
    last_reload_failure: dict[str, Any] | None = Field(
        None, description="The last failed or rejected reload while this model kept "
        "serving (`outcome`: failed, or rejected by a check).")
    checks: dict[str, str] = Field(
        default_factory=dict, description="What this model passed before it served: "
        "compatible (with the API and the model it replaced), golden (training's golden "
        "predictions reproduced) and additive (SHAP sums to the log-odds): passed, or "
        "skipped and why.")
    follow: dict[str, Any] | None = Field(
        None, description="For models:/<name>@<alias>: the alias followed, how (poll "
        "interval, webhook), the version the registry last named and when.")
    candidate: str | None = None
    trained_at: str | None = None
    definition: str | None = Field(None, description="Response definition (iwg, iwg_or, ge50).")
    target: str | None = None
    cv_metrics: dict[str, float] = Field(default_factory=dict, description="Nested "
                                         "cross-validated metrics of the whole training "
                                         "procedure (selection included): mean over repeats "
                                         "and 95% CI.")
    microbiome_added_value: dict[str, float] = Field(
        default_factory=dict, description="Combined minus clinical-only AUROC on the same "
        "outer folds, with a paired patient-bootstrap 95% CI.")
    recalibration: Recalibration | None = None
    threshold: float | None = Field(None, description="Decision threshold chosen in training "
                                    "(Youden's J on out-of-fold predictions, or fixed).")
    warnings: list[str] = Field(default_factory=list, description="What training flagged: "
                                "a constant model, no microbiome added value.")
    feature_schema: dict[str, Any] = Field(default_factory=dict)


class WebhookAnswer(BaseModel):
    status: Literal["accepted", "ignored"]
    reason: str


class ValidationProblem(BaseModel):
    patient_index: int | None = Field(None, description="Position of the patient the problem "
                                      "is in, from 0, if any.")
    patient_id: str | None = Field(None, description="That patient's id, truncated to 64 "
                                   "characters.")
    field: str = Field(..., description="Dotted path of the offending field inside the "
                       "patient (or the request); a key the schema does not name is shown by "
                       "its position, `counts[#3]`, never by its text.")
    message: str = Field(..., description="What is wrong; never the value that was sent.")


class ValidationErrorResponse(BaseModel):
    detail: list[ValidationProblem]
    more: int = Field(0, description="Further problems not listed.")


class ErrorResponse(BaseModel):
    detail: str
