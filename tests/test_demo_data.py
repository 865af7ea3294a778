"""The synthetic demo data: reproducible, shaped as promised, and with a signal a retrieval model can learn."""

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from training.data.config import DataConfig
from training.data.demo import MAX_EVENTS, MIN_EVENTS, generate_demo
from training.data.load import load_data

FILES = ("interactions.parquet", "users.parquet", "items.parquet")


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    generate_demo(out, n_users=1500, n_items=3000, n_categories=20, seed=7)
    return out


def _codes(column: pa.ChunkedArray) -> np.ndarray:
    return np.asarray(pc.dictionary_encode(column).combine_chunks().indices.to_numpy(zero_copy_only=False))


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path: Path) -> None:
    kwargs = {"n_users": 200, "n_items": 500, "n_categories": 8}
    generate_demo(tmp_path / "a", seed=3, **kwargs)
    generate_demo(tmp_path / "b", seed=3, **kwargs)
    generate_demo(tmp_path / "c", seed=4, **kwargs)
    for name in FILES:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    for name in FILES:
        assert (tmp_path / "a" / name).read_bytes() != (tmp_path / "c" / name).read_bytes()


def test_tables_and_per_user_histories(demo_dir: Path) -> None:
    events = pq.read_table(demo_dir / "interactions.parquet")
    users = pq.read_table(demo_dir / "users.parquet")
    items = pq.read_table(demo_dir / "items.parquet")
    assert events.schema.names == ["user_id", "item_id", "timestamp"]
    assert events.schema.field("timestamp").type == pa.int64()
    assert users.column_names == ["user_id", "age_bucket", "gender", "region"] and users.num_rows == 1500
    assert items.column_names == ["item_id", "category", "brand", "price"] and items.num_rows == 3000
    assert items.schema.field("price").type == pa.float64() and pc.min(items["price"]).as_py() > 0
    assert len(pc.unique(items["category"])) == 20
    assert set(pc.unique(events["item_id"]).to_pylist()) <= set(items["item_id"].to_pylist())
    assert set(pc.unique(events["user_id"]).to_pylist()) == set(users["user_id"].to_pylist())

    user = _codes(events["user_id"])
    times = events["timestamp"].to_numpy()
    counts = np.bincount(user)
    assert counts.min() >= MIN_EVENTS and counts.max() <= MAX_EVENTS
    order = np.lexsort((times, user))
    same_user = user[order][1:] == user[order][:-1]
    assert np.all(np.diff(times[order])[same_user] > 0)  # strictly increasing within each user
    pairs = user.astype(np.int64) * 10_000 + _codes(events["item_id"])
    assert len(np.unique(pairs)) == events.num_rows  # no user sees an item twice


def test_popularity_is_heavy_tailed(demo_dir: Path) -> None:
    events = pq.read_table(demo_dir / "interactions.parquet")
    counts = np.sort(np.bincount(_codes(events["item_id"])))[::-1]
    top = counts[: len(counts) // 10].sum() / counts.sum()
    assert top > 0.35  # the 10% most popular items take a large share of all events
    assert counts[0] > 20 * np.median(counts)


def test_profile_shifts_interests(demo_dir: Path) -> None:
    events = pq.read_table(demo_dir / "interactions.parquet")
    users = pq.read_table(demo_dir / "users.parquet")
    items = pq.read_table(demo_dir / "items.parquet")
    category_of = dict(zip(items["item_id"].to_pylist(), items["category"].to_pylist(), strict=True))
    gender_of = dict(zip(users["user_id"].to_pylist(), users["gender"].to_pylist(), strict=True))
    cats = sorted(set(category_of.values()))
    share = {g: np.zeros(len(cats)) for g in ("F", "M")}
    for user, item in zip(events["user_id"].to_pylist(), events["item_id"].to_pylist(), strict=True):
        share[gender_of[user]][cats.index(category_of[item])] += 1
    total_variation = 0.5 * np.abs(share["F"] / share["F"].sum() - share["M"] / share["M"].sum()).sum()
    assert total_variation > 0.15


def test_history_predicts_the_next_item_better_than_popularity(demo_dir: Path) -> None:
    """A crude history model (the user's categories x popularity) must clearly beat global popularity on the held-out
    last event: the signal a two-tower model with a history tower is meant to find."""
    data = load_data(
        DataConfig(format="interactions", path=str(demo_dir), train="interactions.parquet", items="items.parquet")
    )
    item_index = {item: i for i, item in enumerate(data.items["item_id"].to_pylist())}
    category = _codes(data.items["category"])
    n_items, n_categories = len(item_index), category.max() + 1
    known = data.train
    train_users = _codes(pa.chunked_array([*known["user_id"].chunks, *data.test["user_id"].chunks]))
    train_users, test_users = train_users[: known.num_rows], train_users[known.num_rows :]
    train_items = np.array([item_index[i] for i in known["item_id"].to_pylist()])
    test_items = np.array([item_index[i] for i in data.test["item_id"].to_pylist()])

    popularity = np.bincount(train_items, minlength=n_items).astype(float)  # (n_items,)
    n_users = train_users.max() + 1
    seen = np.zeros((n_users, n_items), dtype=bool)
    seen[train_users, train_items] = True
    user_categories = np.zeros((n_users, n_categories))
    np.add.at(user_categories, (train_users, category[train_items]), 1.0)
    within = popularity / np.bincount(category, weights=popularity, minlength=n_categories)[category]
    history_score = user_categories[:, category] * within  # (n_users, n_items)

    def hit_rate(scores: np.ndarray, k: int = 50) -> float:
        scores = np.where(seen[test_users], -np.inf, scores[test_users] if scores.ndim == 2 else scores)
        top = np.argpartition(-scores, k, axis=1)[:, :k]
        return float(np.mean(np.any(top == test_items[:, None], axis=1)))

    popular = hit_rate(popularity)
    personal = hit_rate(history_score)
    assert popular > 0.05  # popularity is a real baseline, not a strawman
    assert personal > 1.6 * popular, (personal, popular)
