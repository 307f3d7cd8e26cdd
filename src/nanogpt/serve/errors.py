"""Errors as OpenAI writes them, for every status `nanogpt serve` answers: `{"error": {message, type, param, code}}`.

`install_error_handlers` makes FastAPI's and Starlette's own answers (404 unknown route, 405 wrong method,
422 request validation, an uncaught exception) use that body instead of `{"detail": ...}`, and bounds the
request body (413), counting a chunked body as it arrives so no client can make the server buffer more.

The `type` of each status is OpenAI's (`ERROR_TYPES`), as its API answers:
- 400, 404, 405, 413, 422: "invalid_request_error" (the model and an unknown URL included: OpenAI answers
  404 "invalid_request_error" with code "model_not_found" / "unknown_url");
- 401: "invalid_request_error" with code "invalid_api_key": OpenAI does not use a separate
  authentication type (clients tell it by the status; the openai SDK raises AuthenticationError on 401);
- 429: "requests" with code "rate_limit_exceeded", as OpenAI's requests-per-minute limit;
- 500, 503: "server_error" (vLLM writes its exception class names, e.g. "BadRequestError", and the HTTP
  status as `code`; OpenAI's strings are what clients written against OpenAI match on).
`code` is a string or null, never the status (the status is the HTTP one).

    install_error_handlers(app, max_body_bytes=8 * 2**20)
    raise ApiError(404, "The model 'x' does not exist", param="model", code="model_not_found")
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the serve extra is imported where it is used, never at import time
    from starlette.responses import JSONResponse

DEFAULT_MAX_BODY_BYTES = 8 * 2**20

ERROR_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "requests",
    500: "server_error",
    503: "server_error",
}


def error_type(status: int) -> str:
    """OpenAI's `type` for an HTTP status: invalid_request_error for 4xx, server_error for 5xx."""
    return ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """`{"error": {"message", "type", "param", "code"}}`: all four keys, always, as OpenAI writes them."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class ApiError(Exception):
    """An answer other than 200, raised anywhere below a handler; `install_error_handlers` writes it."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def error_response(
    status: int,
    message: str,
    *,
    param: str | None = None,
    code: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    """A JSONResponse with OpenAI's error body, its `type` from the status."""
    from starlette.responses import JSONResponse

    body = error_body(message, error_type(status), param, code)
    return JSONResponse(body, status_code=status, headers=headers)


def model_not_found_error(model: str, served: str, param: str | None = "model") -> ApiError:
    """404 "model_not_found": the request named a model this server does not serve."""
    message = f"The model {model!r} does not exist; this server serves {served!r}"
    return ApiError(404, message, param=param, code="model_not_found")


def model_not_found(model: str, served: str, param: str | None = "model") -> JSONResponse:
    """`model_not_found_error` as a response."""
    e = model_not_found_error(model, served, param)
    return error_response(e.status, e.message, param=e.param, code=e.code)


def internal_error_response(exc: BaseException) -> JSONResponse:
    """500 with one line naming the exception, never a traceback."""
    text = " ".join(str(exc).split())[:500]  # one line, bounded
    return error_response(500, f"internal error: {type(exc).__name__}" + (f": {text}" if text else ""))


def validation_message(errors: list[Any]) -> tuple[str, str | None]:
    """A one-line message and the param of FastAPI's request-validation `errors()` (the first error's place)."""
    parts, param = [], None
    for e in errors:
        loc = [str(x) for x in e.get("loc", ()) if x not in ("body", "query", "path", "header")]
        if param is None and loc:
            param = ".".join(loc)
        parts.append(f"{'.'.join(loc) or 'request'}: {e.get('msg', 'invalid')}")
    return "; ".join(parts) or "the request is not valid", param


class BodyTooLarge(Exception):
    """The request body went past the limit while it was being read."""


class _BodyLimit:
    """ASGI middleware: a 413 for a body over `limit` bytes, a 500 body for any uncaught exception, and
    nothing (no traceback either) for a client that hung up while it was still sending its body.

    Content-Length is checked before anything is read; without one (chunked), the bytes are counted as they
    arrive and reading stops at the first chunk past the limit, so at most `limit` bytes plus one chunk are
    ever held. It must sit inside any middleware that catches exceptions (so theirs see a 413 response, not
    a BodyTooLarge), which `install_error_handlers` ensures by being called before such middleware is added.
    """

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        from starlette.requests import ClientDisconnect

        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = f"the request body is over this server's limit of {self.limit} bytes"
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            await error_response(413, too_large)(scope, receive, send)
            return
        seen = 0
        started = False

        async def counted_receive() -> dict[str, Any]:
            nonlocal seen
            message: dict[str, Any] = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise BodyTooLarge
            return message

        async def tracked_send(message: dict[str, Any]) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except ClientDisconnect:  # it hung up while sending its body: nobody to answer (the log says 499)
            return
        except BodyTooLarge:
            if started:
                raise
            await error_response(413, too_large)(scope, receive, send)
        except Exception as e:  # never a crash page: a 500 with one line, the traceback in the server's log
            if started:  # a streamed answer already sent its status: all one can do is end it
                raise
            logging.getLogger("nanogpt.serve").error("internal error", exc_info=e)
            await internal_error_response(e)(scope, receive, send)


def install_error_handlers(app: Any, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
    """OpenAI-shaped bodies for Starlette's 404/405, FastAPI's 422, `ApiError`, uncaught exceptions; 413.

    Call it before adding other middleware: the body limit must sit inside them (see `_BodyLimit`).
    """
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    if max_body_bytes < 1:
        raise ValueError(f"max_body_bytes={max_body_bytes} must be >= 1")

    async def http_error(request: Any, exc: HTTPException) -> JSONResponse:
        status = exc.status_code
        if status == 404:
            return error_response(
                404,
                f"Unknown request URL: {request.method} {request.url.path}. Please check the URL for typos.",
                code="unknown_url",
            )
        if status == 405:
            allow = (exc.headers or {}).get("Allow") or (exc.headers or {}).get("allow")
            return error_response(
                405,
                f"Method {request.method} is not allowed on {request.url.path}"
                + (f"; use {allow}" if allow else ""),
                headers=exc.headers,
            )
        return error_response(status, str(exc.detail), headers=exc.headers)

    async def validation_error(request: Any, exc: RequestValidationError) -> JSONResponse:
        message, param = validation_message(list(exc.errors()))
        return error_response(422, message, param=param)

    async def api_error(request: Any, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.message, param=exc.param, code=exc.code, headers=exc.headers)

    async def server_error(request: Any, exc: Exception) -> JSONResponse:
        return internal_error_response(exc)

    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(Exception, server_error)  # Starlette's outermost guard, for outer middleware
    app.add_middleware(_BodyLimit, limit=max_body_bytes)
