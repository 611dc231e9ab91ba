"""MLflow registry webhooks: verify a delivery, and say whether it concerns our alias.

MLflow (3.3+) signs each delivery as Standard Webhooks do (mlflow/webhooks/delivery.py):
`X-MLflow-Signature: v1,<base64 HMAC-SHA256 of "<delivery id>.<timestamp>.<body>">` with the
webhook's secret, beside `X-MLflow-Delivery-Id` and `X-MLflow-Timestamp` (Unix seconds). The
HMAC is the endpoint's only authentication, so it is checked before anything in the body is
read, in constant time; the timestamp (signed too) bounds replays.

A verified delivery never chooses what is loaded: it only makes the slot ask the registry
where the alias points (`ModelSlot.wake`), as polling does.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

SIGNATURE = "x-mlflow-signature"
DELIVERY_ID = "x-mlflow-delivery-id"
TIMESTAMP = "x-mlflow-timestamp"
VERSION = "v1"
ALIAS_CREATED = "model_version_alias.created"
MAX_BODY = 64 * 1024  # MLflow's registry payloads are a few hundred bytes
DELIVERY_ID_PATTERN = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
TIMESTAMP_PATTERN = re.compile(r"^[0-9]{1,12}$")  # ASCII digits: "²".isdigit() is True
SEEN = 1024  # delivery ids remembered, to answer a replay within the window once


class Refused(Exception):
    """A delivery refused: `status` 400 (malformed), 401 (signature or age) or 413."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class Delivery:
    delivery_id: str
    event: str  # "<entity>.<action>"
    data: dict[str, Any]


def signature(secret: bytes, delivery_id: str, timestamp: str, body: bytes) -> str:
    """MLflow's `_generate_hmac_signature`, over the body's bytes as sent."""
    signed = delivery_id.encode() + b"." + timestamp.encode() + b"." + body
    digest = hmac.new(secret, signed, hashlib.sha256).digest()
    return f"{VERSION},{base64.b64encode(digest).decode()}"


def verify(secret: bytes, headers: Any, body: bytes, max_age: float,
           now: float | None = None) -> Delivery:
    """The delivery, if MLflow signed it with `secret` within `max_age` seconds of `now`."""
    if len(body) > MAX_BODY:
        raise Refused(413, f"body over {MAX_BODY} bytes")
    delivery_id, timestamp = headers.get(DELIVERY_ID), headers.get(TIMESTAMP)
    sent = headers.get(SIGNATURE)
    if not delivery_id or not DELIVERY_ID_PATTERN.match(delivery_id):
        raise Refused(400, "missing or malformed X-MLflow-Delivery-Id")
    if not timestamp or not TIMESTAMP_PATTERN.match(timestamp):
        raise Refused(400, "missing or malformed X-MLflow-Timestamp (Unix seconds)")
    if not sent:
        raise Refused(401, "missing X-MLflow-Signature")
    expected = signature(secret, delivery_id, timestamp, body).encode()
    matched = False
    for candidate in sent.split():  # "v1,<sig> v1,<sig>": any one may match
        matched |= hmac.compare_digest(candidate.encode(), expected)
    if not matched:
        raise Refused(401, "signature does not verify")
    age = (time.time() if now is None else now) - int(timestamp)
    if abs(age) > max_age:
        raise Refused(401, "timestamp outside the accepted window (stale or in the future)")
    try:
        payload = json.loads(body)
        event = f"{payload['entity']}.{payload['action']}"
        data = payload["data"]
        if not isinstance(data, dict):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        raise Refused(400, "not an MLflow webhook payload (entity, action, data)") from None
    return Delivery(delivery_id, event, data)


class Replays:
    """Delivery ids already acted on (bounded): a replay inside the window is a no-op."""

    def __init__(self, size: int = SEEN) -> None:
        self.size = size
        self._seen: OrderedDict[str, None] = OrderedDict()

    def first(self, delivery_id: str) -> bool:
        if delivery_id in self._seen:
            return False
        self._seen[delivery_id] = None
        if len(self._seen) > self.size:
            self._seen.popitem(last=False)
        return True


def ignored_because(delivery: Delivery, followed: tuple[str, str] | None,
                    replays: Replays) -> str | None:
    """Why a verified delivery needs no action, or None when it concerns the alias this
    service follows (`followed`: its (name, alias), None when it does not follow one) and
    is its first delivery. A replay is only counted once everything else matched."""
    if delivery.event != ALIAS_CREATED:
        return f"event {delivery.event} is not followed"
    if followed is None:
        return "this service does not serve a models:/<name>@<alias> URI"
    if (delivery.data.get("name"), delivery.data.get("alias")) != followed:
        return "another model or alias"
    if not replays.first(delivery.delivery_id):
        return "delivery already received"
    return None
