"""Every failure as OpenAI's error object: 4xx for what the client got wrong, 429 when the engine is full, 503 when
the engine fails or is not there yet."""

from __future__ import annotations

import math

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from llmpq_serve.server.protocol import ErrorBody, ErrorResponse
from llmpq_serve.validation import problem


class APIError(Exception):
    def __init__(self, status: int, message: str, *, error_type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = ErrorResponse(error=ErrorBody(message=message, type=error_type, param=param, code=code))
        self.headers = headers

    def response(self) -> JSONResponse:
        return JSONResponse(self.body.model_dump(), status_code=self.status, headers=self.headers)


def queue_full(retry_after: float) -> APIError:
    # Retry-After is whole seconds; 0 would invite an immediate retry into the same full queue.
    seconds = max(1, math.ceil(retry_after))
    return APIError(429, f"the server is at capacity; retry after {seconds} s", error_type="rate_limit_error",
                    code="queue_full", headers={"Retry-After": str(seconds)})


def engine_failed(reason: str) -> APIError:
    return APIError(503, f"the engine failed: {reason}", error_type="server_error", code="engine_error")


NOT_LOADED = "the model is not loaded yet"


def engine_not_ready(reason: str = NOT_LOADED) -> APIError:
    return APIError(503, reason, error_type="server_error", code="engine_not_ready")


async def _api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    return exc.response()


async def _invalid_request(request: Request, exc: Exception) -> JSONResponse:
    """FastAPI's 422 list of pydantic errors as one 400. `param` is the first offending top-level field: deeper parts
    of pydantic's locations also name union members ("prompt.str"), which are no parameter of the API."""
    assert isinstance(exc, RequestValidationError)
    problems, fields = [], []
    content_type = request.headers.get("content-type", "")
    for error in exc.errors():
        if error["type"] == "json_invalid":  # its location is a character offset, not a field
            problems.append(f"the body is not valid JSON: {error['ctx']['error']} at character {error['loc'][-1]}")
            continue
        location = error["loc"][1:]  # it starts with "body"
        if not location and not _says_json(content_type):  # FastAPI then leaves the body unparsed: say why
            problems.append(f"the body must be a JSON object sent with Content-Type: application/json (this one "
                            f"came with {content_type and 'Content-Type: ' + content_type or 'no Content-Type'})")
            continue
        fields.append(str(location[0]) if location else None)
        problems.append(problem(error, location or ["body"]))
    message = "invalid request: " + "; ".join(problems)
    return APIError(400, message, param=next(filter(None, fields), None)).response()


def _says_json(content_type: str) -> bool:
    media = content_type.split(";")[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    error_type = "server_error" if exc.status_code >= 500 else "invalid_request_error"
    return APIError(exc.status_code, str(exc.detail), error_type=error_type, headers=exc.headers).response()


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.add_exception_handler(HTTPException, _http_error)
