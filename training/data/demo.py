"""A synthetic but learnable retrieval data set, so that every command runs without a download.

The generative story, chosen so that a two-tower model has something real to find:
- items belong to categories of uneven size, carry a brand (nested in the category) and a price; popularity over the
  catalog is power-law;
- a user's profile (age bucket, gender, region) shifts which categories they like; each user has 1-4 weighted
  interests among them, a favourite brand in each and a taste for cheap or expensive items;
- a user's history is a run of sessions; a session mostly stays inside one interest (and often repeats the previous
  session's), picking items by popularity reshaped by the user's brand and price taste; a few events wander off to
  globally popular items.
So profile and history both predict the next item far better than global popularity does. All randomness comes from
one numpy Generator: the same seed writes byte-identical files.
"""

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

AGE_BUCKETS = ["18-24", "25-34", "35-44", "45-54", "55+"]
GENDERS = ["F", "M"]
N_REGIONS = 8
MIN_EVENTS, MAX_EVENTS = 10, 80
START_TIME = 1_700_000_000  # 2023-11-14, integer seconds
_POPULARITY_EXPONENT = 0.8  # Zipf-like: the r-th most popular item has weight r^-0.8
_MAX_BRANDS = 12  # per category
_STAY_IN_INTEREST = 0.6  # chance that a session keeps the previous session's interest
_ON_INTEREST = 0.9  # chance that an event stays inside the session's interest
_BRAND_BOOST = 4.0  # weight multiplier for the user's favourite brand in a category


def generate_demo(
    out_dir: Path, *, n_users: int = 3000, n_items: int = 4000, n_categories: int = 24, seed: int = 0
) -> None:
    """Write interactions.parquet (user_id, item_id, timestamp), users.parquet and items.parquet into `out_dir`."""
    if n_categories < 1 or n_items < n_categories or n_users < 1:
        raise ValueError("need n_users >= 1 and n_items >= n_categories >= 1")
    rng = np.random.default_rng(seed)
    catalog = _make_catalog(rng, n_items, n_categories)
    profiles = _make_profiles(rng, n_users, n_categories)
    users, items, times = _make_histories(rng, catalog, profiles)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    item_ids = _ids("i", n_items)
    user_ids = _ids("u", n_users)
    order = np.lexsort((users, times))  # the log as it would be recorded: by time
    _write_parquet(
        pa.table(
            {
                "user_id": pa.array(user_ids[users[order]]),
                "item_id": pa.array(item_ids[items[order]]),
                "timestamp": pa.array(times[order]),
            }
        ),
        out_dir / "interactions.parquet",
    )
    _write_parquet(
        pa.table(
            {
                "user_id": pa.array(user_ids),
                "age_bucket": pa.array(np.array(AGE_BUCKETS)[profiles["age"]]),
                "gender": pa.array(np.array(GENDERS)[profiles["gender"]]),
                "region": pa.array(np.char.add("r", profiles["region"].astype(str))),
            }
        ),
        out_dir / "users.parquet",
    )
    _write_parquet(
        pa.table(
            {
                "item_id": pa.array(item_ids),
                "category": pa.array(_ids("c", n_categories)[catalog["category"]]),
                "brand": pa.array(catalog["brand_name"]),
                "price": pa.array(catalog["price"]),
            }
        ),
        out_dir / "items.parquet",
    )


def _write_parquet(table: pa.Table, path: Path) -> None:
    """Write beside the target and rename, so an interrupted run never leaves a truncated file behind."""
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def _make_catalog(rng: np.random.Generator, n_items: int, n_categories: int) -> dict[str, np.ndarray]:
    share = rng.dirichlet(np.full(n_categories, 2.0))  # uneven category sizes
    category = np.r_[np.arange(n_categories), rng.choice(n_categories, n_items - n_categories, p=share)]
    category = rng.permutation(category)  # (n_items,), every category non-empty
    n_brands = rng.integers(3, _MAX_BRANDS + 1, n_categories)  # brands per category
    brand = np.empty(n_items, dtype=np.int64)  # brand index within its category
    for c in range(n_categories):
        members = np.flatnonzero(category == c)
        brand_share = 1.0 / np.arange(1, n_brands[c] + 1)  # a few big brands, a long tail
        brand[members] = rng.choice(n_brands[c], len(members), p=brand_share / brand_share.sum())
    brand_name = np.array([f"b{c:02d}{b:02d}" for c, b in zip(category, brand, strict=True)])
    log_base = rng.uniform(np.log(5.0), np.log(200.0), n_categories)  # category price level
    log_premium = rng.normal(0.0, 0.3, (n_categories, _MAX_BRANDS))  # brand premium
    log_price = log_base[category] + log_premium[category, brand] + rng.normal(0.0, 0.4, n_items)
    popularity = (1.0 + rng.permutation(n_items)) ** -_POPULARITY_EXPONENT  # (n_items,) Zipf over a random ranking
    return {
        "category": category,
        "brand": brand,
        "brand_name": brand_name,
        "price": np.round(np.exp(log_price), 2),
        "log_price_rel": log_price - log_base[category],  # cheap < 0 < expensive, within the category
        "popularity": popularity,
    }


def _make_profiles(rng: np.random.Generator, n_users: int, n_categories: int) -> dict[str, np.ndarray]:
    age = rng.choice(len(AGE_BUCKETS), n_users, p=[0.15, 0.3, 0.25, 0.18, 0.12])
    gender = rng.integers(0, len(GENDERS), n_users)
    region = rng.integers(0, N_REGIONS, n_users)
    # Category affinity = age + gender + region effects + personal noise: the profile predicts interests.
    affinity = (
        rng.normal(0.0, 1.2, (len(AGE_BUCKETS), n_categories))[age]
        + rng.normal(0.0, 1.2, (len(GENDERS), n_categories))[gender]
        + rng.normal(0.0, 0.6, (N_REGIONS, n_categories))[region]
        + rng.normal(0.0, 0.5, (n_users, n_categories))
    )  # (n_users, n_categories)
    prior = np.exp(affinity - affinity.max(axis=1, keepdims=True))
    prior /= prior.sum(axis=1, keepdims=True)
    n_interests = np.minimum(rng.choice([1, 2, 3, 4], n_users, p=[0.3, 0.35, 0.2, 0.15]), n_categories)
    # Price taste grows with age: older buckets lean to the expensive end of a category.
    price_taste = rng.normal((age - 2) * 0.4, 0.6)
    n_events = np.clip(np.round(np.exp(rng.normal(3.3, 0.6, n_users))), MIN_EVENTS, MAX_EVENTS).astype(np.int64)
    return {
        "age": age,
        "gender": gender,
        "region": region,
        "prior": prior,
        "n_interests": n_interests,
        "price_taste": price_taste,
        "n_events": n_events,
    }


def _make_histories(
    rng: np.random.Generator, catalog: dict[str, np.ndarray], profiles: dict[str, np.ndarray]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(users, items, timestamps), each (n_events_total,), one user after another, times increasing per user."""
    category = catalog["category"]
    global_cdf = np.cumsum(catalog["popularity"]) / catalog["popularity"].sum()
    members = [np.flatnonzero(category == c) for c in range(int(category.max()) + 1)]
    out_users, out_items, out_times = [], [], []
    for user in range(len(profiles["age"])):
        k = int(profiles["n_interests"][user])
        interests = rng.choice(len(members), k, replace=False, p=profiles["prior"][user])
        interest_weights = rng.dirichlet(np.full(k, 1.5))
        cdfs = [_taste_cdf(rng, catalog, members[c], profiles["price_taste"][user]) for c in interests]
        target = int(profiles["n_events"][user])
        draws = 2 * target + 10  # extra draws: repeats of an already seen item are dropped below
        session_of = np.cumsum(rng.random(draws) < 1.0 / 4.0)  # (draws,) session number, mean length 4
        n_sessions = int(session_of[-1]) + 1
        session_interest = np.empty(n_sessions, dtype=np.int64)
        fresh = rng.choice(k, n_sessions, p=interest_weights)
        stay = rng.random(n_sessions) < _STAY_IN_INTEREST
        session_interest[0] = fresh[0]
        for s in range(1, n_sessions):
            session_interest[s] = session_interest[s - 1] if stay[s] else fresh[s]
        event_interest = session_interest[session_of]  # (draws,)
        uniform = rng.random(draws)
        items = np.searchsorted(global_cdf, rng.random(draws), side="right")  # wandering events
        on_interest = rng.random(draws) < _ON_INTEREST
        for j in range(k):
            pick = on_interest & (event_interest == j)
            items[pick] = members[interests[j]][np.searchsorted(cdfs[j], uniform[pick], side="right")]
        items = np.minimum(items, len(category) - 1)
        _, first = np.unique(items, return_index=True)
        keep = np.sort(first)[:target]  # first occurrences, in draw order
        items, sessions = items[keep], session_of[keep]
        if len(items) < target:  # tiny categories ran dry: top up with unseen popular items
            unseen = np.setdiff1d(np.argsort(-catalog["popularity"], kind="stable")[: 4 * target], items)
            extra = unseen[: target - len(items)]
            items = np.r_[items, extra]
            sessions = np.r_[sessions, np.full(len(extra), sessions[-1] + 1)]
        gaps = np.where(
            np.r_[True, sessions[1:] != sessions[:-1]],
            3600 + rng.exponential(1.5 * 86400, len(items)),  # between sessions: hours to days
            20 + rng.exponential(90.0, len(items)),  # within a session: seconds to minutes
        ).astype(np.int64)
        start = START_TIME + int(rng.integers(0, 30 * 86400))
        out_users.append(np.full(len(items), user, dtype=np.int64))
        out_items.append(items.astype(np.int64))
        out_times.append(start + np.cumsum(gaps))
    return np.concatenate(out_users), np.concatenate(out_items), np.concatenate(out_times)


def _taste_cdf(
    rng: np.random.Generator, catalog: dict[str, np.ndarray], members: np.ndarray, taste: float
) -> np.ndarray:
    """CDF over a category's items for one user: popularity x favourite-brand boost x price taste."""
    weight = catalog["popularity"][members].copy()
    brands = catalog["brand"][members]
    favourite = brands[rng.integers(0, len(members))]  # a brand present in the category
    weight[brands == favourite] *= _BRAND_BOOST
    weight *= np.exp(taste * catalog["log_price_rel"][members])
    cdf = np.cumsum(weight)
    return cdf / cdf[-1]


def _ids(prefix: str, n: int) -> np.ndarray:
    width = len(str(n - 1))
    return np.array([f"{prefix}{i:0{width}d}" for i in range(n)])
