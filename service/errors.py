"""Client errors that say what is wrong and where, and never repeat what was sent.

A request holds medical data. An error names the patient by position and (truncated) id and
the field by its schema path; a key the schema does not name (a taxon lineage, an unknown
field) is shown by its position in its object, and messages never include the value.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import status
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError

from service.schemas import ValidationErrorResponse, ValidationProblem

MAX_PROBLEMS = 20
ID_CHARACTERS = 64


class ClientError(Exception):
    """A request the service refuses, with its status and problems."""

    def __init__(self, status_code: int, problems: list[ValidationProblem], more: int = 0
                 ) -> None:
        super().__init__(status_code)
        self.status_code = status_code
        self.problems = problems
        self.more = more

    def response(self) -> JSONResponse:
        body = ValidationErrorResponse(detail=self.problems, more=self.more)
        return JSONResponse(body.model_dump(), status_code=self.status_code)


def problem(message: str, field: str = "body", index: int | None = None,
            patient_id: str | None = None) -> ValidationProblem:
    return ValidationProblem(patient_index=index, patient_id=truncated(patient_id),
                             field=field, message=message)


def truncated(patient_id: object) -> str | None:
    if not isinstance(patient_id, str):
        return None
    return patient_id if len(patient_id) <= ID_CHARACTERS else patient_id[:ID_CHARACTERS] + "…"


def parse(model: type[BaseModel], body: bytes) -> Any:
    """Validate a JSON body: 400 for what is not JSON (with line and column), 422 for what
    breaks the schema."""
    try:
        return model.model_validate_json(body)
    except ValidationError as error:
        errors = error.errors(include_input=False, include_url=False)
        if errors and errors[0]["type"] == "json_invalid":
            raise ClientError(status.HTTP_400_BAD_REQUEST, [problem(
                errors[0]["msg"].replace("Invalid JSON", "invalid JSON", 1))]) from None
        raise ClientError(status.HTTP_422_UNPROCESSABLE_CONTENT,
                          _problems(model, errors[:MAX_PROBLEMS], body),
                          max(0, len(errors) - MAX_PROBLEMS)) from None


def _problems(model: type[BaseModel], errors: list[Any], body: bytes) -> list[ValidationProblem]:
    try:
        document = json.loads(body)
    except ValueError:  # valid for pydantic's parser, not for json (e.g. a huge exponent)
        document = None
    names = _field_names(model)
    problems = []
    for item in errors:
        loc = list(item["loc"])
        index = patient_id = None
        if len(loc) >= 2 and loc[0] == "patients" and isinstance(loc[1], int):
            index = loc[1]
            patient = _at(document, loc[:2])
            patient_id = patient.get("patient_id") if isinstance(patient, dict) else None
            path, parent = loc[2:], loc[:2]
        else:
            path, parent = loc, []
        problems.append(problem(item["msg"], _path(path, parent, document, names) or "body",
                                index, patient_id))
    return problems


def _path(path: list[Any], parent: list[Any], document: Any, names: set[str]) -> str:
    """Dotted schema path; list positions as [i], keys the schema does not name as
    [#position in their object]."""
    parts: list[str] = []
    for i, part in enumerate(path):
        if part == "[key]":  # pydantic's marker for "the key itself": shown by position
            continue
        if isinstance(part, int):
            parts.append(f"[{part}]")
        elif part in names:
            parts.append(("." if parts else "") + part)
        else:
            container = _at(document, parent + [p for p in path[:i] if p != "[key]"])
            keys = list(container) if isinstance(container, dict) else []
            parts.append(f"[#{keys.index(part)}]" if part in keys else "[#?]")
    return "".join(parts)


def _at(document: Any, loc: list[Any]) -> Any:
    for part in loc:
        try:
            document = document[part]
        except (KeyError, IndexError, TypeError):
            return None
    return document


def _field_names(model: type[BaseModel]) -> set[str]:
    """Every field name of the request model and the models inside it."""
    names: set[str] = set()
    seen: set[type[BaseModel]] = set()
    pending = [model]
    while pending:
        current = pending.pop()
        seen.add(current)
        for name, info in current.model_fields.items():
            names.add(name)
            pending += [m for m in _models_in(info.annotation) if m not in seen]
    return names


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in getattr(annotation, "__args__", ()) for m in _models_in(arg)]
