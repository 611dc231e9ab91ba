"""API keys: `Authorization: Bearer <key>` or `X-API-Key: <key>`, compared in constant time.

Keys come from the environment (`ITP_API_KEYS`, comma-separated, several for rotation) or a
mounted secrets file (`ITP_API_KEYS_FILE`); the admin reload has a key of its own
(`ITP_ADMIN_KEY`). A 401 never says which part was wrong.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, HTTPException, Request, Security, status
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

bearer = HTTPBearer(auto_error=False, description="An API key as a bearer token.")
api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False,
                              description="An API key (alternative to the bearer token).")

def unauthorised() -> HTTPException:
    """A new exception each time: one shared instance would keep every raise's traceback
    (and the request in it) alive."""
    return HTTPException(status.HTTP_401_UNAUTHORIZED, detail="missing or invalid credentials",
                         headers={"WWW-Authenticate": "Bearer"})


def matches(supplied: str | None, keys: list[bytes]) -> bool:
    """Whether `supplied` is one of `keys`; every key is compared, so the time taken says
    nothing about which key came close."""
    candidate = (supplied or "").encode()
    found = False
    for key in keys:
        found |= hmac.compare_digest(candidate, key)
    return found and bool(candidate)


def _supplied(credentials: HTTPAuthorizationCredentials | None, header: str | None
              ) -> str | None:
    return credentials.credentials if credentials is not None else header


def require_api_key(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)],
    header: Annotated[str | None, Security(api_key_header)],
) -> None:
    keys: list[bytes] = request.app.state.api_keys
    if keys and not matches(_supplied(credentials, header), keys):
        raise unauthorised()


def require_admin_key(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)],
    header: Annotated[str | None, Security(api_key_header)],
) -> None:
    token = request.app.state.settings.admin_token
    if token is None:
        raise HTTPException(status.HTTP_403_FORBIDDEN,
                            detail="reload is disabled: no ITP_ADMIN_KEY is set")
    if not matches(_supplied(credentials, header), [token.get_secret_value().encode()]):
        raise unauthorised()


ApiKey = Depends(require_api_key)  # route-level: checked before anything else is resolved
AdminKey = Depends(require_admin_key)
