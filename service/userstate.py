"""User state for a request: profile fields and recent history, from layered sources (DESIGN §7).

    profile = bundle's users.parquet row  <  Redis hash quiver:user:<id>  <  the request's `features`
    history = the request's `history`, else Redis list quiver:hist:<id> (newest first), else the bundle's stored one
    history times = from the same source as the history (`history_timestamps`, quiver:hist_time:<id>, the bundle's
                    `history_time`), for models that read them; None where that source has none

Redis is the live feature store; the bundle's tables are the embedded default (the only source without
QUIVER_REDIS_URL, and what a user Redis has not seen yet starts from). A Redis that is down or slower than its
timeout never fails a request: the call is abandoned, the answer comes from the other layers and is flagged
`redis_unavailable`, and after a short back-off the next request tries Redis again, so the service heals by itself.
A user known to no layer and with no history gets the popularity fallback.
"""

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import redis.asyncio as aioredis
from redis.exceptions import RedisError

log = logging.getLogger("quiver.userstate")

REDIS_UNAVAILABLE = "redis_unavailable"
POPULARITY_FALLBACK = "popularity_fallback"
HISTORY_TIME_MISSING = "history_time_missing"  # a time-reading model served a history whose source kept no times


def user_key(user_id: str) -> str:
    return f"quiver:user:{user_id}"


def hist_key(user_id: str) -> str:
    return f"quiver:hist:{user_id}"


def hist_time_key(user_id: str) -> str:
    """The click times of hist_key's items (seconds), newest first, kept the same length."""
    return f"quiver:hist_time:{user_id}"


class BundleUsers:
    """A bundle's users.parquet as a lookup: profile columns and stored history (oldest first) per user id."""

    def __init__(self, users: pa.Table, columns: Sequence[str]) -> None:
        self.columns = sorted(set(columns) | {"user_id"})  # profile fields the bundle's user features read
        self.table = users
        self.row = {str(u): i for i, u in enumerate(users["user_id"].to_pylist())}
        self._types = {c: users.schema.field(c).type for c in self.columns if c in users.column_names}

    def get(self, user_id: str) -> tuple[dict[str, Any], list[str]] | None:
        r = self.row.get(user_id)
        if r is None:
            return None
        rec = self.table.slice(r, 1).to_pylist()[0]
        profile = {c: rec.get(c) for c in self.columns if c != "user_id"}
        return profile, [str(x) for x in rec.get("history") or []]

    def times(self, user_id: str) -> list[int] | None:
        """The stored history's click times, where the bundle kept them (models that read them)."""
        r = self.row.get(user_id)
        if r is None or "history_time" not in self.table.column_names:
            return None
        return [int(t) for t in self.table.column("history_time")[r].as_py() or []]

    def profile_table(self, profiles: Sequence[Mapping[str, Any]]) -> pa.Table:
        """Rows of profile fields (strings from Redis or JSON values from a request) as a table typed like
        users.parquet, so the bundle's encodings read them exactly as in training. A value that does not convert
        becomes null (out-of-vocabulary / mean) rather than failing the request."""
        cols: dict[str, pa.Array] = {}
        for c in self.columns:
            values = [p.get(c) for p in profiles]
            typ = self._types.get(c, pa.string())
            cols[c] = _typed(values, typ)
        return pa.table(cols)


def _typed(values: list[Any], typ: pa.DataType) -> pa.Array:
    try:
        return pa.array(values, type=typ)
    except (pa.ArrowInvalid, pa.ArrowTypeError, ValueError, TypeError, OverflowError):
        pass
    out = []
    for v in values:
        try:
            out.append(pa.array([v], type=pa.string()).cast(typ)[0].as_py() if v is not None else None)
        except (pa.ArrowInvalid, pa.ArrowTypeError, ValueError, TypeError, OverflowError):
            out.append(None)
    return pa.array(out, type=typ)


@dataclass
class UserState:
    user_id: str
    profile: dict[str, Any]  # profile field -> value (user_id included)
    history: list[str]  # item ids, oldest first
    source: str  # where the history came from: request | redis | bundle | none
    known: bool  # some layer knows this user (or the request described them)
    degraded: list[str] = field(default_factory=list)
    history_time: list[int] | None = None  # click times of `history` (seconds), where its source has them

    @property
    def popularity_only(self) -> bool:
        return not self.known and not self.history


@dataclass
class RedisRecord:
    profile: dict[str, str]
    history: list[str] | None  # oldest first; None when Redis holds no history for the user
    history_time: list[int] | None = None  # their click times, when Redis holds one per item


class RedisStore:
    """redis.asyncio over one bounded connection pool; every call is cut at `timeout_s`."""

    def __init__(self, url: str, timeout_ms: float, pool_size: int, backoff_s: float = 1.0) -> None:
        self.timeout_s = timeout_ms / 1000.0
        self.backoff_s = backoff_s
        self.pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=pool_size,
            timeout=self.timeout_s,  # waiting for a free connection counts against the budget too
            socket_timeout=self.timeout_s,
            socket_connect_timeout=self.timeout_s,
            decode_responses=True,
        )
        self.client = aioredis.Redis(connection_pool=self.pool)
        self._down_until = 0.0
        self._append = self.client.register_script(_APPEND_LUA)

    @property
    def healthy(self) -> bool:
        return time.monotonic() >= self._down_until

    def _failed(self, err: BaseException) -> None:
        if self.healthy:
            log.warning("redis unavailable (%s): serving degraded for %.1fs", type(err).__name__, self.backoff_s)
        self._down_until = time.monotonic() + self.backoff_s

    async def _bounded(self, coro: Any) -> Any:
        return await asyncio.wait_for(coro, self.timeout_s)

    async def fetch(self, user_id: str, history_len: int) -> RedisRecord | None:
        """Profile hash and newest `history_len` clicks in one round trip; None when Redis is unavailable."""
        if not self.healthy:
            return None
        try:
            pipe = self.client.pipeline(transaction=False)
            pipe.hgetall(user_key(user_id))
            pipe.lrange(hist_key(user_id), 0, max(0, history_len - 1))
            pipe.lrange(hist_time_key(user_id), 0, max(0, history_len - 1))
            profile, newest_first, times = await self._bounded(pipe.execute())
        except (RedisError, OSError, TimeoutError) as err:
            self._failed(err)
            return None
        # Redis deletes a list when it empties, so an empty answer means no history is stored for this user.
        history = list(reversed(newest_first)) if newest_first else None
        clock = [int(t) for t in reversed(times)] if history and len(times) == len(history) else None
        return RedisRecord(dict(profile), history, clock)

    async def append(
        self,
        user_id: str,
        items: Sequence[str],
        times: Sequence[int],
        max_len: int,
        seed: Sequence[str],
        seed_times: Sequence[int] | None = None,
    ) -> int:
        """Append clicks (oldest first) and their times to the user's history and trim both lists, in one round trip
        (one Lua script).

        `seed` (oldest first) is the user's stored history from the bundle, with its times where the bundle kept
        them (else 0): it is written first when Redis holds no history yet, so a user's first live click extends
        their history instead of replacing it. Raises on failure: a click that was not stored must not be
        acknowledged."""
        seed_clock = list(seed_times) if seed_times is not None and len(seed_times) == len(seed) else [0] * len(seed)
        args = [max_len, len(seed), len(items), *reversed(seed), *reversed(seed_clock), *items, *times]
        n = await self._bounded(self._append(keys=[hist_key(user_id), hist_time_key(user_id)], args=args))
        return int(n)

    async def ping(self) -> bool:
        try:
            ok = bool(await self._bounded(self.client.ping()))
        except (RedisError, OSError, TimeoutError) as err:
            self._failed(err)
            return False
        self._down_until = 0.0
        return ok

    async def close(self) -> None:
        await self.client.aclose()
        await self.pool.aclose()


# KEYS[1] history list, KEYS[2] its times (both newest first, one time per item); ARGV: max_len, n_seed, n_clicks,
# the seed's items then times (newest first, n_seed each), the clicks' items then times (oldest first, n_clicks each).
# A times list that does not match its history (written before times were kept) is rebuilt with zeros under the
# clicks', so the two stay aligned item for item.
_APPEND_LUA = """
local key, tkey = KEYS[1], KEYS[2]
local max_len, n_seed, n_clicks = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local seed, clicks = 4, 4 + 2 * n_seed
if n_seed > 0 and redis.call('EXISTS', key) == 0 then
  redis.call('DEL', tkey)
  for i = 0, n_seed - 1 do
    redis.call('RPUSH', key, ARGV[seed + i])
    redis.call('RPUSH', tkey, ARGV[seed + n_seed + i])
  end
end
local have = redis.call('LLEN', key)
if redis.call('LLEN', tkey) ~= have then
  redis.call('DEL', tkey)
  for i = 1, have do redis.call('RPUSH', tkey, 0) end
end
for i = 0, n_clicks - 1 do
  redis.call('LPUSH', key, ARGV[clicks + i])
  redis.call('LPUSH', tkey, ARGV[clicks + n_clicks + i])
end
redis.call('LTRIM', key, 0, max_len - 1)
redis.call('LTRIM', tkey, 0, max_len - 1)
return redis.call('LLEN', key)
"""


def resolve(
    user_id: str,
    bundle: BundleUsers,
    redis_record: RedisRecord | None,
    redis_configured: bool,
    history: Sequence[str] | None,
    features: Mapping[str, Any] | None,
    history_time: Sequence[int] | None = None,
) -> UserState:
    """Layer the sources (module docstring) into one user's state."""
    degraded = [REDIS_UNAVAILABLE] if redis_configured and redis_record is None else []
    stored = bundle.get(user_id)
    profile: dict[str, Any] = dict(stored[0]) if stored else {}
    known = stored is not None
    if redis_record is not None:
        profile.update({k: v for k, v in redis_record.profile.items() if k in bundle.columns and k != "user_id"})
        known = known or bool(redis_record.profile) or redis_record.history is not None
    if features:
        profile.update(features)
        known = True
    profile["user_id"] = user_id
    times: list[int] | None = None
    if history is not None:
        hist, source = [str(h) for h in history], "request"
        times = list(history_time) if history_time is not None else None
    elif redis_record is not None and redis_record.history is not None:
        hist, source, times = redis_record.history, "redis", redis_record.history_time
    elif stored is not None:
        hist, source, times = stored[1], "bundle", bundle.times(user_id)
    else:
        hist, source, times = [], "none", []
    state = UserState(user_id, profile, hist, source, known or bool(hist), degraded, times)
    if state.popularity_only:
        state.degraded.append(POPULARITY_FALLBACK)
    return state
