"""413 for request bodies over QUIVER_MAX_BODY_BYTES, before the body is read into memory or parsed.

A declared Content-Length over the limit is refused at once; a chunked body (no length) is counted as it arrives and
refused the moment it passes the limit, so a client cannot stream an unbounded body into the JSON parser.
"""

from fastapi import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import TrackedSend, send_json


def _too_large(size: str, max_bytes: int) -> str:
    return f"request body: {size}, the limit is {max_bytes} bytes"


class BodyTooLarge(HTTPException):
    """An HTTPException so that FastAPI's body reader passes it on as a 413 instead of wrapping it in a 400."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(413, _too_large(f"over {max_bytes} bytes (chunked)", max_bytes))


class BodyLimit:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await send_json(send, 413, {"detail": _too_large(f"{int(declared)} bytes", self.max_bytes)})
            return
        seen = 0

        async def counted_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        tracked = TrackedSend(send)
        try:
            await self.app(scope, counted_receive, tracked)
        except BodyTooLarge as err:
            if not tracked.started:
                await send_json(send, 413, {"detail": err.detail})
