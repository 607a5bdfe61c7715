"""One error body for everything: ``{"error": {"code": ..., "message": ...}}``.

Routes raise :class:`ApiError`; :func:`register_error_handlers` maps it, request validation errors, Starlette's
HTTP errors (404/405) and anything unhandled to that body. Unhandled errors are logged with their traceback; their
body never carries the exception's text or a path.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("mgg.service")

_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 401: "unauthorized", 403: "forbidden"}


class ApiError(Exception):
    """An error answered as ``status`` with ``{"error": {"code": code, "message": message}}`` and ``headers``."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


def error_response(status: int, code: str, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


async def _api_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return error_response(exc.status, exc.code, exc.message, exc.headers)


async def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    parts = []
    for e in exc.errors():
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        parts.append(f"{loc}: {e.get('msg')}" if loc else str(e.get("msg")))
    return error_response(422, "invalid_request", "; ".join(parts) or "invalid request")


async def _http_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = _HTTP_CODES.get(exc.status_code, f"http_{exc.status_code}")
    return error_response(exc.status_code, code, str(exc.detail), exc.headers)


async def _unhandled(_: Request, exc: Exception) -> JSONResponse:
    # normally service.http_guard.HttpGuard answers these first (with a request id); never show the exception
    log.exception("unhandled error")
    return error_response(500, "internal_error", "an internal error occurred; see the server log")


def register_error_handlers(app: FastAPI) -> None:
    """Install the handlers that give every error response the shared body shape."""
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unhandled)


__all__ = ["ApiError", "error_response", "register_error_handlers"]
