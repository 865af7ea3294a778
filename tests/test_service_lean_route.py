"""LeanRoute (the /recall and /rank handler) answers every body as FastAPI's own handler does: the same status, the
same error locations, the same body on success. Both serve one endpoint side by side through real uvicorn."""

from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from fastapi import APIRouter, FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.deps import ServingDep
from service.errors import http_error, validation_error
from service.lean_route import LeanRoute
from service.responses import JSON
from service.schemas import RecallRequest
from tests.serving import running_app

JSON_TYPE = {"content-type": "application/json"}
# (body, headers): valid, bad fields, bad JSON, not JSON, no declared type, not an object, bad UTF-8
CASES: list[tuple[bytes, dict[str, str]]] = [
    (b'{"user_id": "u1", "k": 3}', JSON_TYPE),
    (b'{"user_id": "u1", "k": 3, "history": ["a", "b"]}', {"content-type": "application/json; charset=utf-8"}),
    (b'{"user_id": "u1", "k": 3}', {"content-type": "application/vnd.quiver+json"}),
    (b'{"user_id": "u1", "k": "three"}', JSON_TYPE),
    (b'{"k": 3}', JSON_TYPE),
    (b'{"user_id": "u1", "k": 3, "nope": 1}', JSON_TYPE),
    (b'{"user_id": "u1", "k": 0}', JSON_TYPE),
    (b'{"user_id": "u1", "k": 3', JSON_TYPE),
    (b"", JSON_TYPE),
    (b"user_id=u1&k=3", {"content-type": "application/x-www-form-urlencoded"}),
    (b'{"user_id": "u1", "k": 3}', {"content-type": "text/plain"}),
    (b'{"user_id": "u1", "k": 3}', {}),
    (b"[1, 2]", JSON_TYPE),
    (b"null", JSON_TYPE),
    (b'{"user_id": "\xff\xfe", "k": 3}', JSON_TYPE),
]


async def answer(req: RecallRequest, serving: ServingDep) -> JSON:
    return JSON({"user_id": req.user_id, "k": req.k, "history": req.history, "runtime": serving.rt})


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    app = FastAPI()
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    lean, plain = APIRouter(route_class=LeanRoute), APIRouter()
    lean.post("/lean")(answer)
    plain.post("/plain")(answer)
    app.include_router(lean)
    app.include_router(plain)
    app.state.services = SimpleNamespace(holder=SimpleNamespace(current="the runtime"))
    with running_app(app) as base:
        yield base


def _locs(r: httpx.Response) -> list[list[Any]]:
    return [e["loc"] for e in r.json()["detail"]]


@pytest.mark.parametrize("body,headers", CASES)
def test_lean_route_answers_as_fastapi_does(url: str, body: bytes, headers: dict[str, str]) -> None:
    lean = httpx.post(f"{url}/lean", content=body, headers=headers, timeout=10)
    plain = httpx.post(f"{url}/plain", content=body, headers=headers, timeout=10)
    assert lean.status_code == plain.status_code, (lean.text, plain.text)
    if plain.status_code == 200:
        assert lean.json() == plain.json() and lean.json()["runtime"] == "the runtime"
    else:
        assert lean.status_code == 422 and lean.json()["message"].startswith("body")
        # the same fields named (FastAPI adds a JSON syntax error's character offset, pydantic does not)
        assert [loc[:1] for loc in _locs(lean)] == [["body"]] * len(_locs(lean)), lean.text
        if plain.json()["detail"][0]["type"] != "json_invalid":
            assert _locs(lean) == _locs(plain), (lean.text, plain.text)


def test_the_bad_field_is_named(url: str) -> None:
    r = httpx.post(f"{url}/lean", content=b'{"user_id": "u1", "k": "three"}', headers=JSON_TYPE, timeout=10)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "k"]
    r = httpx.post(f"{url}/lean", content=b'{"user_id": "u1"}', headers={"content-type": "text/plain"}, timeout=10)
    assert r.status_code == 422 and "application/json" in r.json()["message"]


def test_an_endpoint_that_does_not_fit_is_refused_at_declaration() -> None:
    async def no_serving(req: RecallRequest) -> JSON:
        return JSON({})

    async def not_a_body(user_id: str, serving: ServingDep) -> JSON:
        return JSON({})

    for endpoint in (no_serving, not_a_body):
        with pytest.raises(TypeError, match="LeanRoute"):
            APIRouter(route_class=LeanRoute).post("/x")(endpoint)
