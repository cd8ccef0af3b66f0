"""The service's exception tree and the handlers that turn it into OpenAI error bodies.

    ServiceError (500 internal_error)
    ├── BadRequestError (400 invalid_request_error)
    │   └── ContextLengthError (400, code context_length_exceeded)
    ├── ModelNotFoundError (404 model_not_found)
    ├── NotFoundError (404: a route this server does not serve)
    ├── ClientGoneError (499: the client left; the work was cancelled)
    └── UnavailableError (503 service_unavailable)

    agent.openai_engine.EngineError (502 engine_error: the remote model server failed)

Body: {"error": {"message", "type", "param", "code"}}. Validation errors, unknown routes and
anything unexpected get the same shape; a client mistake is never a 500.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from agent.openai_engine import EngineError
from service.protocol import FieldError

log = logging.getLogger("searchagent.service")


class ServiceError(Exception):
    status = 500
    type = "internal_error"
    code: str | None = None

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class BadRequestError(ServiceError):
    status = 400
    type = "invalid_request_error"


class ContextLengthError(BadRequestError):
    code = "context_length_exceeded"


class ModelNotFoundError(ServiceError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class NotFoundError(ServiceError):
    status = 404
    type = "invalid_request_error"


class ClientGoneError(ServiceError):
    """The client disconnected before the response: nobody reads it (nginx's 499)."""

    status = 499
    type = "client_closed_request"


class UnavailableError(ServiceError):
    status = 503
    type = "service_unavailable"


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _response(status: int, body: dict) -> JSONResponse:
    return JSONResponse(body, status_code=status)


async def _service_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServiceError)
    return _response(exc.status, error_body(exc.message, exc.type, exc.param, exc.code))


_TYPE_NAMES = frozenset({"str", "int", "float", "bool", "none", "list", "dict"})


def _field_path(loc: tuple) -> str | None:
    """`messages.0.content` from pydantic's loc, without the union branches it names on the way
    (`str`, `list[TextPart]`, `function-after[...]`, a model's class name) and without "body"."""
    parts = [
        str(p)
        for p in loc
        if isinstance(p, int)
        or (p != "body" and p.isidentifier() and p not in _TYPE_NAMES and not p[0].isupper())
    ]
    return ".".join(parts) or None


def _most_telling(errors: list) -> dict:
    """The error to report. A value that fails a union fails every branch: "Input should be a
    valid string" from the `str` branch says less than "at most 4 items" from the list branch,
    so the first error that is not a plain wrong-type mismatch wins."""
    if not errors:
        return {}
    telling = [e for e in errors if not str(e.get("type", "")).endswith("_type")]
    # all mismatches: the deepest names the part that is wrong (`content.0.text`, not `content`)
    return telling[0] if telling else max(errors, key=lambda e: len(e.get("loc", ())))


def _message(error: dict) -> str:
    return str(error.get("msg", "invalid request")).removeprefix("Value error, ")


async def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    error = _most_telling(list(exc.errors()))
    param = _field_path(tuple(error.get("loc", ())))
    if error.get("type") == "json_invalid":  # its loc is a character offset, not a field
        message, param = "request body is not valid JSON", None
    elif error.get("type") == "missing" and param is None:
        message = "the request has no body: send a JSON object"
    elif isinstance(found := error.get("ctx", {}).get("error"), FieldError):
        message, param = _message(error), found.field  # a whole-body check names the field
    else:
        message = f"{param + ': ' if param else ''}{_message(error)}"
    return _response(400, error_body(message, "invalid_request_error", param))


async def _http_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    type_ = "invalid_request_error" if exc.status_code < 500 else "internal_error"
    response = _response(exc.status_code, error_body(str(exc.detail), type_))
    response.headers.update(exc.headers or {})  # a 405's Allow, which RFC 9110 requires
    return response


async def _engine_error(_: Request, exc: Exception) -> JSONResponse:
    log.error("engine error: %s", exc)
    return _response(502, error_body(f"model server error: {exc}", "engine_error"))


async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error", exc_info=exc)
    return _response(500, error_body("internal server error", "internal_error"))


def install_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(EngineError, _engine_error)
    app.add_exception_handler(Exception, _unexpected)
