"""The OpenAI error object, shared by the router and the emulated replica.

``{"error": {"message", "type", "param", "code"}}``, with the HTTP status as ``code``.
"""

from __future__ import annotations

import json
from typing import Any

_DEFAULT_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    405: "MethodNotAllowed",
    409: "ConflictError",
    413: "RequestEntityTooLarge",
    429: "RateLimitError",
    500: "InternalServerError",
    502: "BadGatewayError",
    503: "ServiceUnavailableError",
    504: "GatewayTimeoutError",
}


class ApiError(Exception):
    """An error that becomes an OpenAI-format JSON response."""

    def __init__(self, status: int, message: str, err_type: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.err_type = err_type or _DEFAULT_TYPES.get(status, "InternalServerError")
        self.param = param

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.err_type, "param": self.param, "code": self.status}}

    def body_bytes(self) -> bytes:
        return json.dumps(self.body(), separators=(",", ":")).encode()


def bad_request(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param=param)


def load_json_object(raw: bytes) -> dict[str, Any]:
    """A request body that must be a JSON object; anything else is a 400 that says what was wrong."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad_request(f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise bad_request("request body must be a JSON object")
    return body
