"""Bounds on a request body: its size (413 over QUIVER_MAX_BODY_BYTES) and its arrival time (408 past
QUIVER_BODY_TIMEOUT_S), both enforced before the body is parsed.

Size: a declared Content-Length over the limit is refused at once; a chunked body (no length) is counted as it arrives
and refused the moment it passes the limit, so a client cannot stream an unbounded body into the JSON parser.

Time: uvicorn hands a request to the app as soon as its headers are in, and then waits for the body as long as the
client likes, so a client that sends headers and half a body would hold a connection (and a request slot) forever.
Each wait for more body is cut at the deadline; the answer is a 408 with `Connection: close`, which makes uvicorn drop
the connection, since what is left of the half-sent body would otherwise be read as the next request.
"""

import asyncio

from fastapi import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import TrackedSend, send_json


def _too_large(size: str, max_bytes: int) -> str:
    return f"request body: {size}, the limit is {max_bytes} bytes"


class BodyTooLarge(HTTPException):
    """An HTTPException so that FastAPI's body reader passes it on as a 413 instead of wrapping it in a 400."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(413, _too_large(f"over {max_bytes} bytes (chunked)", max_bytes))


class BodyTimedOut(HTTPException):
    def __init__(self, timeout_s: float) -> None:
        detail = f"request body: not complete after {timeout_s:g} s (QUIVER_BODY_TIMEOUT_S); connection closed"
        super().__init__(408, detail, headers={"connection": "close"})


class BodyLimit:
    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await send_json(send, 413, {"detail": _too_large(f"{int(declared)} bytes", self.max_bytes)})
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        seen, complete = 0, False

        async def bounded_receive() -> Message:
            nonlocal seen, complete
            if complete:  # the body is in: later calls wait for a disconnect, which has no deadline
                return await receive()
            try:
                # a timeout scope, not wait_for: wait_for wraps every receive in a task of its own (2% of the event
                # loop's time per /recall in py-spy), where the body is nearly always in already
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                raise BodyTimedOut(self.timeout_s) from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                complete = not message.get("more_body", False)
                if seen > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        tracked = TrackedSend(send)
        try:
            await self.app(scope, bounded_receive, tracked)
        except (BodyTooLarge, BodyTimedOut) as err:
            if not tracked.started:
                await send_json(send, err.status_code, {"detail": err.detail}, err.headers)
