"""Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` with the matching HTTP status.

Every failure the server answers goes through `APIError`, so clients (the official SDKs included) see the same
shape whatever went wrong; the SDKs map the status onto their typed exceptions (400 -> BadRequestError, ...).
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse

from lmport.bridge.protocol import BridgeError
from lmport.bridge.service import to_bridge_error
from lmport.engine.errors import LMPortError

logger = logging.getLogger("lmport.http")


class APIError(Exception):
    """An error answered to the client; `param` names the offending request field when there is one."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(param: str | None, message: str) -> APIError:
    return APIError(400, message, param=param, code="invalid_params")


def model_not_found(model: str, served: list[str]) -> APIError:
    return APIError(404, f"The model {model!r} does not exist; this server serves {served}.", param="model",
                    code="model_not_found")


def too_large(param: str | None, message: str, code: str = "context_length_exceeded") -> APIError:
    return APIError(413, message, param=param, code=code)


def rate_limited(message: str, retry_after_s: float) -> APIError:
    seconds = max(1, int(retry_after_s + 0.999))  # Retry-After takes whole seconds; never 0 (clients would spin)
    return APIError(429, message, type="rate_limit_error", code="rate_limit_exceeded",
                    headers={"Retry-After": str(seconds)})


def not_ready(message: str = "The model is still loading; retry shortly.") -> APIError:
    return APIError(503, message, type="service_unavailable", code="model_loading", headers={"Retry-After": "1"})


_BRIDGE_STATUS = {  # service error code -> (HTTP status, OpenAI error type); any other code is a 500 server_error
    "invalid_params": (400, "invalid_request_error"),
    "invalid_request": (400, "invalid_request_error"),
    "unsupported": (400, "invalid_request_error"),
    "not_found": (404, "invalid_request_error"),
    "out_of_memory": (413, "invalid_request_error"),
    "cancelled": (499, "invalid_request_error"),
    "overloaded": (503, "service_unavailable"),
    "memory_budget_exceeded": (503, "service_unavailable"),  # the model cannot be loaded now (details: the numbers)
    "shutting_down": (503, "service_unavailable"),
    "deadline_exceeded": (504, "timeout"),
}


def from_engine_error(exc: BaseException, renames: dict[str, str] | None = None) -> APIError:
    """Map a service or engine exception onto the HTTP error. Which error code an exception is comes from the
    service (lmport.bridge.service.to_bridge_error), so HTTP and the bridge agree; here only code -> HTTP status and type.
    `renames` maps the service's field names onto the request's: SamplingParams says `max_tokens` where the chat
    request said `max_completion_tokens`, the service says `prompts[1]` where the request said `prompt`."""
    if isinstance(exc, APIError):
        return exc
    if not isinstance(exc, BridgeError):
        error = to_bridge_error(exc)
        if error.code in ("internal", "engine_error"):
            logger.error("unexpected error", exc_info=exc)
        if error.code == "internal":
            return APIError(500, f"internal error: {error.message}", type="server_error", code="internal")
        exc = error
    status, kind = _BRIDGE_STATUS.get(exc.code, (500, "server_error"))
    renames = renames or {}
    field = (exc.details or {}).get("field")
    param = _request_param(field, renames) if field else (renames.get("prompts", "prompt") if status == 413 else None)
    message = exc.message
    if field and param != field:
        message = message.replace(field, param, 1)
    headers = {"Retry-After": "1"} if status == 503 else None
    code = "model_not_found" if status == 404 and field == "model" else exc.code
    return APIError(status, message, type=kind, param=param, code=code, headers=headers)


def _request_param(field: str, renames: dict[str, str]) -> str:
    """`sampling_params.max_tokens` -> `max_completion_tokens` (renamed); `prompts[1]` -> `prompt[1]`."""
    field = re.sub(r"^sampling_params(\[\d+\])?\.", "", field)
    head, rest = re.fullmatch(r"([^.\[]*)(.*)", field).groups()  # type: ignore[union-attr]
    return renames.get(head, head) + rest


def validation_param(loc: tuple[Any, ...]) -> str | None:
    """("body", "messages", 0, "content") -> "messages[0].content"; None for the body as a whole."""
    parts = [p for p in loc if p != "body"]
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not out:
            out = str(part)
        elif _is_type_tag(part):
            continue  # pydantic names the union member it tried ("str", "list[int]"); not a field
        else:
            out += f".{part}"
    return out or None


def _is_type_tag(part: Any) -> bool:
    return isinstance(part, str) and (part in {"str", "int", "float", "bool"} or "[" in part)


def from_validation(errors: list[Any]) -> APIError:
    """pydantic's first complaint as a 400 naming the field ("messages[0].content")."""
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    if first.get("type") == "json_invalid":
        return bad_request(None, f"The request body is not valid JSON: {first.get('msg')}")
    if first.get("type") == "missing" and tuple(first.get("loc", ())) == ("body",):
        return bad_request(None, "The request needs a JSON body.")
    param = validation_param(tuple(first.get("loc", ())))
    message = first.get("msg", "invalid value")
    if any(_is_type_tag(part) for part in first.get("loc", ())):  # a union: pydantic names the member it tried
        message = "matches none of the accepted forms (see docs/serving.md)"
    if first.get("type") == "extra_forbidden":
        message = "unknown parameter (not part of this endpoint's request)"
    detail = f"{param}: {message}" if param else message
    if "input" in first and first.get("type") not in ("missing", "extra_forbidden"):
        detail += f" (got {json.dumps(first['input'], default=str)[:80]})"
    return bad_request(param, detail)


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return from_validation(list(exc.errors())).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return APIError(exc.status_code, str(exc.detail), type=kind).response()

    @app.exception_handler(LMPortError)
    @app.exception_handler(BridgeError)
    async def _engine(_: Request, exc: Exception) -> JSONResponse:
        return from_engine_error(exc).response()
