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


async def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    first = exc.errors()[0] if exc.errors() else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":  # its loc is a character offset, not a field
        message, param = "request body is not valid JSON", None
    else:
        message = f"{param + ': ' if param else ''}{first.get('msg', 'invalid request')}"
    return _response(400, error_body(message, "invalid_request_error", param))


async def _http_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    type_ = "invalid_request_error" if exc.status_code < 500 else "internal_error"
    return _response(exc.status_code, error_body(str(exc.detail), type_))


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
