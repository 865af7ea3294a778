"""The hot routes' request handling: the JSON body parsed by pydantic straight from bytes, the served triple taken
from the app state, and the endpoint called with both, without FastAPI's per-request dependency solving.

FastAPI's own handler for `async def recall(req: RecallRequest, serving: ServingDep)` costs about 3x a plain
Starlette endpoint doing the same work (an ASGI call measured in-process: ~120 µs against ~40-50 µs on this busy VM:
the dependency graph walk, `json.loads`, then validation of the decoded dict). It runs on the event
loop that every request shares, which sets /recall's throughput once the model process has the tower and search
(service/model_process.py). The route is still declared to FastAPI as usual, so its OpenAPI entry (request body,
response model, error statuses) is unchanged; only the handler behind it is replaced.

An endpoint on a `LeanRoute` takes exactly two parameters, the request body model and `ServingDep`, and returns a
`Response`. A body that does not validate raises `RequestValidationError`, as FastAPI's handler does, with each error
located under `body`, so the app's 422 handler answers it the same way; as FastAPI's strict content type does, a
body not declared as JSON is refused, not parsed (tests/test_service_lean_route.py holds the two side by side).
"""

import inspect
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar, get_type_hints

from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import Response

from service.deps import Serving, ServingDep, get_serving

M = TypeVar("M", bound=BaseModel)


def _json_type(content_type: str | None) -> bool:
    if not content_type:
        return False
    mime = content_type.split(";", 1)[0].strip().lower()
    return mime == "application/json" or (mime.startswith("application/") and mime.endswith("+json"))


def parse_body(model: type[M], raw: bytes, content_type: str | None) -> M:
    """As FastAPI reads a JSON body (its strict content type included: a body not declared JSON is not parsed)."""
    if not raw:
        raise RequestValidationError([{"type": "missing", "loc": ("body",), "msg": "Field required"}])
    if not _json_type(content_type):
        msg = f"the body must be sent as Content-Type: application/json, not {content_type or 'none'}"[:200]
        raise RequestValidationError([{"type": "content_type", "loc": ("body",), "msg": msg}])
    try:
        return model.model_validate_json(raw)
    except ValidationError as err:
        errors = err.errors(include_url=False, include_input=False, include_context=False)
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in errors]) from None


def _body_model(endpoint: Callable[..., Any]) -> type[BaseModel]:
    """The endpoint's first parameter's model; the second must be `ServingDep`, which the handler provides."""
    hints = get_type_hints(endpoint, include_extras=True)
    names = list(inspect.signature(endpoint).parameters)
    body = hints.get(names[0]) if names else None
    fits = isinstance(body, type) and issubclass(body, BaseModel) and len(names) == 2
    if not fits or hints.get(names[1]) != ServingDep:
        raise TypeError(f"a LeanRoute endpoint takes (body: BaseModel, serving: ServingDep), not {names}")
    return body


class LeanRoute(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        model = _body_model(self.endpoint)
        endpoint: Callable[[BaseModel, Serving], Awaitable[Response]] = self.endpoint

        async def handler(request: Request) -> Response:
            body = parse_body(model, await request.body(), request.headers.get("content-type"))
            return await endpoint(body, await get_serving(request))

        return handler
