"""Errors of the HTTP API in OpenAI's envelope.

Contract: every error is ``{"error": {"message", "type", "param", "code"}}`` with ``code`` the HTTP
status; :func:`error_type` gives OpenAI's type for a status, and a client's mistake (a status under
500) is never a ``server_error``. A route raises :class:`APIError`; the app turns it into
:func:`error_response`.
"""

from __future__ import annotations

from fastapi.responses import JSONResponse

from . import protocol as P

ERROR_TYPES = {
    401: "authentication_error",
    404: "not_found_error",
    503: "unavailable_error",
}


def error_type(status: int) -> str:
    """OpenAI's error type for an HTTP status: a client's mistake is never a ``server_error``."""
    return ERROR_TYPES.get(status) or ("invalid_request_error" if status < 500 else "server_error")


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers


def error_response(status: int, message: str, param: str | None = None, headers: dict | None = None) -> JSONResponse:
    body = P.ErrorResponse(error=P.ErrorInfo(message=message, type=error_type(status), param=param, code=status))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)
