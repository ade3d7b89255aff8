"""Every failure as an HTTP status and a body in the caller's dialect (OpenAI or Ollama).

The one boundary: handlers raise ApiError for what the gateway refuses itself, the
client library raises DaemonError / DaemonUnreachable / ProtocolViolation; ``api_error``
turns any of them into an ApiError, and the middleware (server.py) or a stream that
already started renders it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rkllmctl.errors import DaemonError, DaemonUnreachable, ProtocolViolation

#: A daemon error's name -> (HTTP status, OpenAI error type, OpenAI error code).
DAEMON_ERRORS: dict[str, tuple[int, str, str | None]] = {
    "invalid_field": (400, "invalid_request_error", "invalid_value"),
    "invalid_name": (400, "invalid_request_error", "invalid_value"),
    "too_large": (400, "invalid_request_error", "too_large"),
    "context_overflow": (400, "invalid_request_error", "context_length_exceeded"),
    "not_found": (404, "invalid_request_error", "not_found"),
    "queue_full": (429, "rate_limit_exceeded", "queue_full"),
    "shutting_down": (503, "server_error", "shutting_down"),
    "timeout": (504, "server_error", "timeout"),
    "cache_build_failed": (500, "server_error", "cache_build_failed"),
    "backend": (500, "server_error", "backend_error"),
    "storage": (500, "server_error", "storage_error"),
    "model_file": (400, "invalid_request_error", "model_file"),
    "hub": (502, "server_error", "hub_error"),
    "internal": (500, "server_error", "internal_error"),
    # The gateway built a request the daemon could not read: a bug here.
    "malformed": (500, "server_error", "gateway_error"),
    "unsupported_version": (500, "server_error", "gateway_error"),
    "unknown_op": (500, "server_error", "gateway_error"),
    "duplicate_id": (500, "server_error", "gateway_error"),
}
#: A capability the daemon says the model lacks -> the OpenAI request parameter that asked for it.
CAPABILITY_PARAMS = {"tools": "tools", "thinking": "reasoning_effort"}
#: Seconds a client is told to wait before trying again (Retry-After) after these.
RETRY_AFTER = {429: "1", 503: "2"}


@dataclass
class ApiError(Exception):
    status: int
    message: str
    type: str = "invalid_request_error"
    code: str | None = None
    param: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__init__(self.message)
        if self.status in RETRY_AFTER:
            self.headers.setdefault("Retry-After", RETRY_AFTER[self.status])

    def openai(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def ollama(self) -> dict[str, Any]:
        return {"error": self.message}

    def ollama_status(self) -> int:
        """Ollama answers a full queue with 503 ("server busy"), not 429."""
        return 503 if self.code == "queue_full" else self.status


def invalid(message: str, param: str | None = None, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, code=code, param=param)


def api_error(exc: Exception) -> ApiError | None:
    """The ApiError for an exception of the client library (or ``exc`` itself); None for others."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, DaemonError) and exc.details.get("capability") in CAPABILITY_PARAMS:
        # The model cannot do what was asked (tools, thinking): OpenAI's refusal of a parameter a model lacks.
        return ApiError(400, exc.message, "invalid_request_error", "unsupported_parameter", CAPABILITY_PARAMS[exc.details["capability"]])
    if isinstance(exc, DaemonError) and exc.name == "not_found" and "model" in exc.details:
        # No such model: OpenAI's 404 model_not_found; Ollama's body is the message, "model 'x' not found".
        return ApiError(404, exc.message, "invalid_request_error", "model_not_found", "model")
    if isinstance(exc, DaemonError):
        status, kind, code = DAEMON_ERRORS.get(exc.name, (500, "server_error", exc.name))
        return ApiError(status, exc.message, kind, code, exc.details.get("field"))
    if isinstance(exc, DaemonUnreachable):
        return ApiError(503, f"the model daemon is unavailable: {exc}", "server_error", "daemon_unavailable")
    if isinstance(exc, ProtocolViolation):
        return ApiError(502, f"the model daemon answered out of protocol: {exc}", "server_error", "bad_gateway")
    return None
