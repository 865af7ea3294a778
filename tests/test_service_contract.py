"""The API says what it does: the OpenAPI document names the real bodies and every status, input is strict, and a
body that never arrives is cut off (issue 15, items 4 and 5). Through a real uvicorn server."""

import json
import socket
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import httpx
import pytest

from tests.serving import Tree, running, settings


@pytest.fixture(scope="module")
def url(serving_tree: Tree) -> Iterator[str]:
    with running(settings(serving_tree, body_timeout_s=0.5)) as base:
        yield base


@pytest.fixture(scope="module")
def api(url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=url, timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def openapi(api: httpx.Client) -> dict:
    return api.get("/openapi.json").json()


def _ref(content: dict) -> str:
    schema = content["application/json"]["schema"]
    return schema.get("$ref", "").rsplit("/", 1)[-1]


def test_openapi_names_the_response_bodies(openapi: dict) -> None:
    paths = openapi["paths"]
    for path, method, model in [
        ("/recall", "post", "RecallResponse"),
        ("/rank", "post", "RankResponse"),
        ("/events", "post", "EventsResponse"),
        ("/readyz", "get", "Readiness"),
        ("/models", "get", "Loaded"),
        ("/admin/reload", "post", "ReloadResponse"),
    ]:
        assert _ref(paths[path][method]["responses"]["200"]["content"]) == model, path
    scored = openapi["components"]["schemas"]["ScoredItem"]
    assert set(scored["required"]) == {"item_id", "score"}
    assert "items" in openapi["components"]["schemas"]["RecallResponse"]["required"]
    metrics = paths["/metrics"]["get"]["responses"]["200"]["content"]
    assert list(metrics) == ["text/plain"]


def test_openapi_documents_every_error_status(openapi: dict) -> None:
    paths = openapi["paths"]
    expected = {
        ("/recall", "post"): {"404", "408", "413", "422", "503"},
        ("/rank", "post"): {"408", "413", "422", "503"},
        ("/events", "post"): {"408", "413", "422", "503"},
        ("/admin/reload", "post"): {"401", "403", "409", "422"},
        ("/models", "get"): {"503"},
        ("/readyz", "get"): {"503"},
    }
    for (path, method), codes in expected.items():
        responses = paths[path][method]["responses"]
        assert codes <= set(responses), (path, set(responses))
        for code in codes:
            assert _ref(responses[code]["content"]) in {"ErrorBody", "ReloadResponse", "Readiness"}


def test_string_and_bool_integers_are_refused(api: httpx.Client) -> None:
    for k in ("10", True, 10.0):
        r = api.post("/recall", json={"user_id": "u001", "k": k})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "k"], (k, r.text)
    assert api.post("/recall", json={"user_id": "u001", "k": 10}).status_code == 200


def test_duplicate_candidates_are_a_422_naming_them(api: httpx.Client) -> None:
    r = api.post("/rank", json={"user_id": "u001", "candidates": ["i001", "i002", "i001"]})
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["body", "candidates"] and "'i001'" in r.json()["message"]


@pytest.mark.parametrize(
    "body",
    [b'{"user_id": "\xff\xfe", "k": 3}', b'{"user_id": "u", "features": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"],
    ids=["invalid-utf8", "deep-nesting"],
)
def test_undecodable_bodies_are_422_naming_the_body(api: httpx.Client, body: bytes) -> None:
    r = api.post("/recall", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["loc"][0] == "body" and "JSON" in r.json()["message"]


def test_unknown_feature_keys_are_ignored_and_reported(api: httpx.Client) -> None:
    r = api.post("/recall", json={"user_id": "u001", "k": 5, "features": {"shoe_size": "44", "user_id": "v"}})
    assert r.status_code == 200, r.text
    assert r.json()["ignored_features"] == ["shoe_size", "user_id"]
    known = api.post("/recall", json={"user_id": "u001", "k": 5, "features": {"region": "r1"}}).json()
    assert known["ignored_features"] is None


def test_models_shows_names_and_versions_not_paths(api: httpx.Client, serving_tree: Tree) -> None:
    text = api.get("/models").text
    body = json.loads(text)
    assert str(serving_tree.root) not in text and "/" not in json.dumps(body["model"]) + json.dumps(body["index"])
    assert body["model"] == {
        "name": "tiny",
        "version": serving_tree.models[1],
        "type": "dssm",
        "similarity": body["model"]["similarity"],
    }
    assert body["index"]["name"] == "tiny" and body["index"]["version"] == serving_tree.indexes[1]
    assert body["last_refusal"] is None


def test_a_half_sent_body_gets_408_and_a_closed_connection(url: str, api: httpx.Client) -> None:
    host, port = urlsplit(url).hostname, urlsplit(url).port
    with socket.create_connection((host, port), timeout=10) as conn:
        head = f"POST /recall HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: 200\r\n\r\n"
        conn.sendall(head.encode() + b'{"user_id": "u0')  # and then nothing more
        started = time.monotonic()
        received = b""
        while True:
            chunk = conn.recv(4096)
            if not chunk:  # the server closed the connection
                break
            received += chunk
        waited = time.monotonic() - started
    assert received.startswith(b"HTTP/1.1 408"), received[:200]
    assert b"QUIVER_BODY_TIMEOUT_S" in received
    assert 0.4 < waited < 5
    assert api.get("/healthz").status_code == 200  # the server itself is fine


def test_a_slow_but_complete_body_is_served(url: str) -> None:
    host, port = urlsplit(url).hostname, urlsplit(url).port
    body = json.dumps({"user_id": "u001", "k": 3}).encode()
    with socket.create_connection((host, port), timeout=10) as conn:
        head = f"POST /recall HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        conn.sendall(f"{head}Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body[:5])
        time.sleep(0.2)  # within the deadline
        conn.sendall(body[5:])
        received = b""
        while chunk := conn.recv(4096):
            received += chunk
    assert received.startswith(b"HTTP/1.1 200"), received[:200]


def test_docs_can_be_turned_off(serving_tree: Tree) -> None:
    with running(settings(serving_tree, docs=False)) as base, httpx.Client(base_url=base) as client:
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert client.get(path).status_code == 404
        assert client.post("/recall", json={"user_id": "u001", "k": 3}).status_code == 200
