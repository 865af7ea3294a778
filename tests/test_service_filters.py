"""`filter` on /recall through a real uvicorn server (issue 17, item 1): exactly k passing items in the order an
unfiltered search ranks them, with exclusions, rerank and the popularity fallback; 422 naming the column for what
cannot apply; an empty answer, flagged, for a filter no item passes."""

from collections.abc import Iterator
from typing import Any

import httpx
import pyarrow.parquet as pq
import pytest

from tests.serving import Tree, running, settings

K = 30


@pytest.fixture(scope="module")
def api(serving_tree: Tree) -> Iterator[httpx.Client]:
    with running(settings(serving_tree)) as url, httpx.Client(base_url=url, timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def catalog(serving_tree: Tree) -> dict[str, dict[str, Any]]:
    """item id -> attributes, from the served model version's catalog."""
    table = pq.read_table(serving_tree.root / "models" / "tiny" / serving_tree.models[1] / "items.parquet")
    return {row["item_id"]: row for row in table.to_pylist()}


@pytest.fixture(scope="module")
def user(serving_tree: Tree) -> str:
    users = pq.read_table(serving_tree.root / "models" / "tiny" / serving_tree.models[1] / "users.parquet")
    return str(users.column("user_id")[0])


def passes(row: dict[str, Any], flt: dict[str, Any]) -> bool:
    for col, want in flt.items():
        v = row[col]
        if v is None:
            return False
        if isinstance(want, list) and v not in want:
            return False
        if isinstance(want, dict):
            ops = {"lt": v < want.get("lt", float("inf")), "le": v <= want.get("le", float("inf"))}
            ops |= {"gt": v > want.get("gt", float("-inf")), "ge": v >= want.get("ge", float("-inf"))}
            if not all(ops[op] for op in want):
                return False
    return True


def recall(api: httpx.Client, **body: Any) -> dict[str, Any]:
    r = api.post("/recall", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def test_models_lists_the_filterable_columns(api: httpx.Client) -> None:
    index = api.get("/models").json()["index"]
    assert index["filterable"] == {"category": "categorical", "brand": "categorical", "price": "numeric"}


def test_filtered_recall_is_the_unfiltered_order_restricted(
    api: httpx.Client, catalog: dict[str, dict[str, Any]], user: str
) -> None:
    """The served index is exact (Flat): the filtered answer must be the whole-catalog ranking, filtered, cut at k."""
    prices = sorted(r["price"] for r in catalog.values())
    cats = sorted({r["category"] for r in catalog.values()})[:3]
    flt = {"category": cats, "price": {"lt": prices[len(prices) // 2]}}
    body = recall(api, user_id=user, k=K, filter=flt)
    everything = recall(api, user_id=user, k=1000)["items"]
    expected = [i for i in everything if passes(catalog[i["item_id"]], flt)][:K]
    assert [i["item_id"] for i in body["items"]] == [i["item_id"] for i in expected]
    assert [i["score"] for i in body["items"]] == pytest.approx([i["score"] for i in expected], abs=1e-5)
    assert len(body["items"]) == K
    assert body["filter_matches"] == sum(passes(r, flt) for r in catalog.values())

    # exclusions come out of the filtered set, and the answer stays k long
    dropped = [i["item_id"] for i in body["items"][:5]]
    again = recall(api, user_id=user, k=K, filter=flt, exclude=dropped)
    assert len(again["items"]) == K and not {i["item_id"] for i in again["items"]} & set(dropped)
    ranked = [i["item_id"] for i in everything if passes(catalog[i["item_id"]], flt)]
    assert [i["item_id"] for i in again["items"]] == [i for i in ranked if i not in dropped][:K]


def test_every_operator_through_http(api: httpx.Client, catalog: dict[str, dict[str, Any]], user: str) -> None:
    prices = sorted(r["price"] for r in catalog.values())
    brand = next(iter(catalog.values()))["brand"]
    for flt in (
        {"brand": [brand]},
        {"price": {"ge": prices[100], "le": prices[200]}},
        {"price": {"gt": prices[-50]}},
        {"category": [next(iter(catalog.values()))["category"]], "price": {"lt": prices[600]}},
    ):
        body = recall(api, user_id=user, k=K, filter=flt, exclude_seen=False)
        matching = sum(passes(r, flt) for r in catalog.values())
        assert body["filter_matches"] == matching
        assert len(body["items"]) == min(K, matching), flt
        assert all(passes(catalog[i["item_id"]], flt) for i in body["items"]), flt


def test_rerank_and_popularity_fallback_keep_the_filter(
    api: httpx.Client, catalog: dict[str, dict[str, Any]], user: str
) -> None:
    cats = sorted({r["category"] for r in catalog.values()})[-2:]
    flt = {"category": cats}
    reranked = recall(api, user_id=user, k=K, filter=flt, rerank=True)
    assert len(reranked["items"]) == K and all(passes(catalog[i["item_id"]], flt) for i in reranked["items"])
    assert all("retrieval_score" in i for i in reranked["items"])
    nobody = recall(api, user_id="nobody-at-all", k=K, filter=flt)
    assert nobody["degraded"] and len(nobody["items"]) == K
    assert all(passes(catalog[i["item_id"]], flt) for i in nobody["items"])
    popular = recall(api, user_id="nobody-at-all", k=1000)["items"]  # the whole catalog by popularity
    assert [i["item_id"] for i in nobody["items"]] == [
        i["item_id"] for i in popular if passes(catalog[i["item_id"]], flt)
    ][:K]


def test_a_filter_no_item_passes_is_an_empty_flagged_answer(api: httpx.Client, user: str) -> None:
    for flt in ({"category": ["no-such-category"]}, {"price": {"lt": -1}}):
        body = recall(api, user_id=user, k=K, filter=flt)
        assert body["items"] == [] and body["filter_matches"] == 0


@pytest.mark.parametrize(
    ("flt", "loc", "words"),
    [
        ({"colour": ["red"]}, ["body", "filter", "colour"], "not a filterable column"),
        ({"price": ["cheap"]}, ["body", "filter", "price"], "not a list"),
        ({"category": {"lt": 3}}, ["body", "filter", "category"], "not a range"),
        ({"category": True}, ["body", "filter", "category"], "not true / false"),
        ({"category": [3]}, ["body", "filter", "category"], "strings"),
        ({"price": {"below": 3}}, ["body", "filter", "price"], None),  # the schema refuses the operator
        ({"price": {"lt": "3"}}, ["body", "filter", "price"], None),  # strict: a string is not a number
        ({"category": []}, ["body", "filter", "category"], None),
    ],
)
def test_bad_filters_are_422_naming_the_column(
    api: httpx.Client, user: str, flt: dict[str, Any], loc: list[str], words: str | None
) -> None:
    r = api.post("/recall", json={"user_id": user, "k": 5, "filter": flt})
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert any(d["loc"][: len(loc)] == loc for d in detail), detail
    if words:
        assert any(words in d["msg"] for d in detail), detail
