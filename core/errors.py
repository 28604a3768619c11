"""One exception hierarchy; each error knows its HTTP status and renders the OpenAI error envelope.

Backends raise these typed errors; server.py maps them to responses in one handler.
"""

from __future__ import annotations

import math
from typing import Any


class ServiceError(Exception):
    status: int = 500
    type: str = "server_error"
    code: str = "internal_error"

    def __init__(self, message: str, *, param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class InvalidRequest(ServiceError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class ContextLengthExceeded(InvalidRequest):
    code = "context_length_exceeded"


class WrongModelKind(InvalidRequest):
    """A chat request sent to an embedding tier, or the like."""

    code = "model_not_supported"


class Unauthorized(ServiceError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class Forbidden(ServiceError):
    """A valid key that may not do this (an admin route without `admin = true`)."""

    status = 403
    type = "permission_error"
    code = "permission_denied"


class ModelNotAllowed(Forbidden):
    """The key is restricted to other tiers."""

    type = "invalid_request_error"
    code = "model_not_allowed"


class ModelNotFound(ServiceError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class NotFound(ServiceError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class MethodNotAllowed(ServiceError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class Conflict(ServiceError):
    status = 409
    type = "invalid_request_error"
    code = "conflict"


class PayloadTooLarge(ServiceError):
    status = 413
    type = "invalid_request_error"
    code = "payload_too_large"


class Overloaded(ServiceError):
    """The tier's queue is full or a request waited too long: retry later."""

    status = 503
    type = "server_error"
    code = "overloaded"

    def __init__(self, message: str, *, retry_after: int = 1, param: str | None = None) -> None:
        super().__init__(message, param=param, headers={"Retry-After": str(max(1, int(retry_after)))})


class RateLimited(ServiceError):
    """A key went over one of its limits. `type` names the limit as OpenAI does ("requests", "tokens")."""

    status = 429
    type = "requests"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after: float, limit: str = "requests") -> None:
        # Whole seconds, rounded up: a client that waits exactly this long finds the limit free again.
        super().__init__(message, headers={"Retry-After": str(max(1, math.ceil(retry_after)))})
        self.type = limit


class ModelUnavailable(ServiceError):
    """The tier's model could not be loaded (missing or corrupt file, library missing)."""

    status = 503
    type = "server_error"
    code = "model_unavailable"


class ShuttingDown(Overloaded):
    code = "shutting_down"


class ClientGone(ServiceError):
    """The client left before its answer was ready; nobody reads this error (logged as 499)."""

    status = 499
    type = "invalid_request_error"
    code = "client_closed_request"


class RequestTimeout(ServiceError):
    """The request ran past its tier's REQUEST_TIMEOUT; its generation was stopped."""

    status = 504
    type = "server_error"
    code = "request_timeout"


class RequestCancelled(ServiceError):
    """The server stopped a running request (forced unload, shutdown deadline); retry later."""

    status = 503
    type = "server_error"
    code = "request_cancelled"

    def __init__(self, message: str, *, retry_after: int = 1) -> None:
        super().__init__(message, headers={"Retry-After": str(max(1, int(retry_after)))})


class BackendError(ServiceError):
    """The model library failed while serving a request; the message is safe to show."""

    status = 500
    type = "server_error"
    code = "backend_error"
