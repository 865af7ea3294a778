"""Every error the API returns is JSON: 4xx naming the field, and a 500 that never drops the connection.

Starlette's own last-resort handler sends its 500 and then re-raises, which makes uvicorn close the keep-alive
connection, so a client's next request on it fails too. `CatchAll` answers the 500 itself and swallows the
exception (after logging it), so one failed request stays one failed request.
"""

import logging
from collections.abc import Callable
from typing import Any

import orjson
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.responses import JSON
from service.schemas import ErrorBody

log = logging.getLogger("quiver.service")


# What each status means where a route can return it; the body is always `ErrorBody`.
STATUS_TEXT = {
    401: "admin token missing",
    403: "admin disabled or wrong token",
    404: "not found (e.g. `model` names a bundle that is not loaded)",
    408: "the request body did not arrive within QUIVER_BODY_TIMEOUT_S (the connection is closed)",
    409: "the newest published bundles were refused; the old ones keep serving",
    413: "request body over QUIVER_MAX_BODY_BYTES",
    422: "invalid request: each bad field named",
    503: "not ready (no model loaded), no ranker for a rerank, or Redis unavailable for /events",
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for the error statuses a route can answer, each with the shared error body."""
    return {code: {"model": ErrorBody, "description": STATUS_TEXT[code]} for code in codes}


def _error_line(err: dict[str, Any]) -> str:
    return f"{'.'.join(str(p) for p in err.get('loc', ()))}: {err.get('msg', 'invalid')}"


async def validation_error(request: Request, exc: Exception) -> Response:
    """422 naming each bad field; the offending input is not echoed back (it may be a megabyte of ids)."""
    assert isinstance(exc, RequestValidationError)
    errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")} for e in exc.errors()]
    return JSON({"detail": errors, "message": "; ".join(_error_line(e) for e in errors)}, status_code=422)


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 400 and exc.__cause__ is not None:
        # FastAPI answers a body it cannot decode (invalid UTF-8, JSON nested past the parser's depth) with a bare
        # 400; it is a malformed request like any other, so it gets the 422 that names what is wrong with it.
        cause = exc.__cause__
        why = "nested too deeply" if isinstance(cause, RecursionError) else f"{type(cause).__name__}: {cause}"
        errors = [{"loc": ["body"], "msg": f"the body is not valid JSON ({why})"[:300], "type": "json_invalid"}]
        return JSON({"detail": errors, "message": _error_line(errors[0])}, status_code=422)
    body: dict[str, Any] = {"detail": exc.detail}
    if isinstance(exc.detail, list):
        body["message"] = "; ".join(_error_line(e) for e in exc.detail)
    return JSON(body, status_code=exc.status_code, headers=exc.headers)


async def send_json(send: Send, status: int, content: Any, extra: dict[str, str] | None = None) -> None:
    """A whole JSON response from plain ASGI middleware, where FastAPI's response classes do not reach."""
    body = orjson.dumps(content)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.encode(), v.encode()) for k, v in (extra or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class TrackedSend:
    """An ASGI `send` that remembers whether the response has started: a middleware may only answer in its place
    until then."""

    def __init__(self, send: Send) -> None:
        self.send = send
        self.started = False

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.started = True
        await self.send(message)


class CatchAll:
    """ASGI middleware: an unexpected exception becomes a logged, counted JSON 500 on a connection that stays up."""

    def __init__(self, app: ASGIApp, on_error: Callable[[], None]) -> None:
        self.app = app
        self.on_error = on_error

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        tracked = TrackedSend(send)
        try:
            await self.app(scope, receive, tracked)
        except Exception:
            log.exception("unhandled error on %s", scope.get("path"))
            self.on_error()
            if tracked.started:  # half a response is out: only closing the connection can tell the client
                raise
            await send_json(send, 500, {"detail": "internal error (logged)"})
