"""User state for a request: profile fields and recent history, from layered sources (DESIGN §7).

    profile = bundle's users.parquet row  <  Redis hash quiver:user:<id>  <  the request's `features`
    history = the request's `history`, else Redis list quiver:hist:<id> (newest first), else the bundle's stored one
    history times = from the same source as the history (`history_timestamps`, quiver:hist_time:<id>, the bundle's
                    `history_time`), for models that read them; None where that source has none

Redis is the live feature store; the bundle's tables are the embedded default (the only source without
QUIVER_REDIS_URL, and what a user Redis has not seen yet starts from). A Redis that is down or slower than its
timeout never fails a request: the call is abandoned and the answer comes from the other layers, flagged
`redis_unavailable`. Only that request pays: a circuit breaker (service/breaker.py) stops calling Redis after
several failures in a row, probes it once a while later and closes on the first answer, so the service heals by
itself, and a successful write closes it too, so a /recall after an acknowledged /events reads Redis.
A user known to no layer and with no history gets the popularity fallback.

Writes are idempotent per event_id (a retry after a timeout whose write did land stores nothing twice) and refresh
a TTL on the user's keys, so the state of users who stopped coming does not stay in Redis for ever.
"""

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, Self, TypeVar

import pyarrow as pa
import redis.asyncio as aioredis
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from service.breaker import CircuitBreaker, State

if TYPE_CHECKING:
    from service.settings import Settings

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


def seen_key(user_id: str) -> str:
    """The user's recent /events event_ids (a sorted set scored by arrival), so a retried batch is stored once."""
    return f"quiver:seen:{user_id}"


class BundleUsers:
    """A bundle's users.parquet as a lookup: profile columns and stored history (oldest first) per user id."""

    def __init__(self, users: pa.Table, columns: Sequence[str]) -> None:
        self.columns = sorted(set(columns) | {"user_id"})  # profile fields the bundle's user features read
        self.table = users
        self.row = {str(u): i for i, u in enumerate(users["user_id"].to_pylist())}
        self._types = {c: users.schema.field(c).type for c in self.columns if c in users.column_names}
        # one contiguous array per column read on every request: a row is a few scalar reads, not a table slice
        # (20 µs, most of it converting columns nobody reads, on the event loop)
        present = [c for c in self.columns if c != "user_id" and c in users.column_names]
        self._profile = {c: users[c].combine_chunks() for c in present}
        self._history = users["history"].combine_chunks() if "history" in users.column_names else None
        self._times = users["history_time"].combine_chunks() if "history_time" in users.column_names else None

    def get(self, user_id: str) -> tuple[dict[str, Any], list[str]] | None:
        r = self.row.get(user_id)
        if r is None:
            return None
        cols = self._profile
        profile = {c: cols[c][r].as_py() if c in cols else None for c in self.columns if c != "user_id"}
        history = self._history[r].as_py() if self._history is not None else None
        return profile, [str(x) for x in history or []]

    def times(self, user_id: str) -> list[int] | None:
        """The stored history's click times, where the bundle kept them (models that read them)."""
        r = self.row.get(user_id)
        if r is None or self._times is None:
            return None
        return [int(t) for t in self._times[r].as_py() or []]

    def rows_table(self, rows: Sequence[int]) -> pa.Table:
        """The stored profiles of these rows, laid out and typed as `profile_table` lays out their `get` profiles
        (a column users.parquet lacks is all null)."""
        take = pa.array(rows, type=pa.int64())
        stored = self._profile | {"user_id": self.table["user_id"]}
        absent = {c: pa.nulls(len(rows), self._types.get(c, pa.string())) for c in self.columns if c not in stored}
        return pa.table({c: stored[c].take(take) if c in stored else absent[c] for c in self.columns})

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
    # the bundle's users.parquet row when `profile` is exactly that row's (no Redis field, no request feature): its
    # tower inputs can then be read from a memo of the row's encoding (service/tower_inputs.py)
    profile_row: int | None = None

    @property
    def popularity_only(self) -> bool:
        return not self.known and not self.history


@dataclass
class RedisRecord:
    profile: dict[str, str]
    history: list[str] | None  # oldest first; None when Redis holds no history for the user
    history_time: list[int] | None = None  # their click times, when Redis holds one per item


class StoreUnavailable(ConnectionError):
    """A store call that did not happen or did not finish: for an append, the clicks may or may not be stored, so
    the caller must not acknowledge them (a retry with the same event_id is safe either way).

    A ConnectionError (so an OSError), so callers that already treat OSError as "Redis unavailable" keep doing so.
    `reason`: breaker_open (not attempted), timeout (no answer within the budget: it may still have run),
    error (Redis refused the connection or the command)."""

    def __init__(self, reason: Literal["breaker_open", "timeout", "error"], detail: str = "") -> None:
        self.reason = reason
        super().__init__(f"{reason}: {detail}" if detail else reason)


class Appended(NamedTuple):
    length: int  # the user's history length after the call
    duplicate: bool  # the event_id was seen within the window: nothing was appended this time


T = TypeVar("T")


class RedisStore:
    """redis.asyncio over one bounded connection pool; every call is cut at `timeout_s` and goes through a circuit
    breaker (service/breaker.py), so a Redis that is down costs a request nothing once the breaker has opened."""

    def __init__(
        self,
        url: str,
        timeout_ms: float,
        pool_size: int,
        *,
        breaker_failures: int = 5,
        breaker_open_s: float = 0.1,
        state_ttl_s: int = 2_592_000,
        event_id_window_s: int = 86_400,
        event_id_max: int = 10_000,
        on_breaker_change: Callable[[State], None] | None = None,
        breaker: CircuitBreaker | None = None,
    ) -> None:
        """`breaker` replaces the one built from `breaker_failures`/`breaker_open_s`/`on_breaker_change` (a test
        hands one with a fake clock)."""
        if breaker is not None and on_breaker_change is not None:
            raise ValueError("on_breaker_change is for the breaker the store builds; set it on the one you pass")
        self.timeout_s = timeout_ms / 1000.0
        self.state_ttl_s = state_ttl_s
        self.event_id_window_s = event_id_window_s
        self.event_id_max = event_id_max
        self.breaker = breaker or CircuitBreaker(breaker_failures, breaker_open_s, on_change=on_breaker_change)
        self.pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=pool_size,
            timeout=self.timeout_s,  # waiting for a free connection counts against the budget too
            socket_timeout=self.timeout_s,
            socket_connect_timeout=self.timeout_s,
            decode_responses=True,
        )
        self.client = aioredis.Redis(connection_pool=self.pool)
        self._append = self.client.register_script(_APPEND_LUA)

    @classmethod
    def from_settings(cls, settings: "Settings", on_breaker_change: Callable[[State], None] | None = None) -> Self:
        if settings.redis_url is None:
            raise ValueError("QUIVER_REDIS_URL is not set")
        return cls(
            settings.redis_url,
            settings.redis_timeout_ms,
            settings.redis_pool_size,
            breaker_failures=settings.redis_breaker_failures,
            breaker_open_s=settings.redis_breaker_open_s,
            state_ttl_s=settings.state_ttl_s,
            event_id_window_s=settings.event_id_window_s,
            event_id_max=settings.event_id_max,
            on_breaker_change=on_breaker_change,
        )

    async def _call(self, op: str, make: Callable[[], Awaitable[T]], gated: bool = True) -> T:
        """One Redis round trip under the breaker and the time budget; raises StoreUnavailable when it did not happen
        or did not finish. The breaker hears of every outcome, so one slow call counts once and does not stop the
        next request from trying Redis."""
        if gated and not self.breaker.allow():
            raise StoreUnavailable("breaker_open", f"{op} not attempted")
        try:
            result = await asyncio.wait_for(make(), self.timeout_s)
        except (TimeoutError, RedisTimeoutError) as err:  # before OSError: the builtin TimeoutError is one
            self._failed(op, err)
            raise StoreUnavailable("timeout", f"{op} got no answer within {self.timeout_s * 1000:.0f} ms") from err
        except (RedisError, OSError) as err:
            self._failed(op, err)
            raise StoreUnavailable("error", f"{op}: {type(err).__name__}: {err}") from err
        except BaseException:
            self.breaker.abandon()  # cancelled: says nothing about Redis, but a probe must not stay out forever
            raise
        if self.breaker.state != "closed":
            log.info("redis answered again: circuit breaker closed")
        self.breaker.success()
        return result

    def _failed(self, op: str, err: BaseException) -> None:
        was = self.breaker.state
        self.breaker.failure()
        if was != "open" and self.breaker.state == "open":
            log.warning(
                "redis unavailable (%s on %s, %d in a row): breaker open, serving degraded for %.1fs",
                type(err).__name__,
                op,
                self.breaker.consecutive_failures,
                self.breaker.open_s,
            )

    async def fetch(self, user_id: str, history_len: int) -> RedisRecord | None:
        """Profile hash and newest `history_len` clicks in one round trip; None when Redis is unavailable or the
        breaker is open (the request is then served from the other layers, flagged degraded)."""
        pipe = self.client.pipeline(transaction=False)
        pipe.hgetall(user_key(user_id))
        pipe.lrange(hist_key(user_id), 0, max(0, history_len - 1))
        pipe.lrange(hist_time_key(user_id), 0, max(0, history_len - 1))
        try:
            profile, newest_first, times = await self._call("fetch", pipe.execute)
        except StoreUnavailable:
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
        event_id: str | None = None,
    ) -> Appended:
        """Append clicks (oldest first) and their times to the user's history and trim both lists, in one atomic
        round trip (one Lua script).

        `seed` (oldest first) is the user's stored history from the bundle, with its times where the bundle kept
        them (else 0): it is written first when Redis holds no history yet, so a user's first live click extends
        their history instead of replacing it.

        `event_id` makes the call idempotent: an id already seen for this user within `event_id_window_s` (and
        among its newest `event_id_max`) appends nothing and answers duplicate=True, so a client may retry after
        any failure, including a timeout whose write did land. The write refreshes the user's key TTLs.

        Raises StoreUnavailable when the clicks may not be stored (breaker open, timeout, error): a click that was
        not stored must not be acknowledged."""
        if event_id == "":
            raise ValueError("event_id: empty (None means no idempotency key)")
        seed_clock = list(seed_times) if seed_times is not None and len(seed_times) == len(seed) else [0] * len(seed)
        keys = [hist_key(user_id), hist_time_key(user_id), seen_key(user_id), user_key(user_id)]
        head = [max_len, len(seed), len(items), self.state_ttl_s, event_id or "", self.event_id_window_s]
        args = [*head, self.event_id_max, *reversed(seed), *reversed(seed_clock), *items, *times]
        # Writes are never shed by the breaker: a click refused while Redis is already back would be a 503 the
        # client did not need, and the write's success is what closes the breaker (read-your-writes).
        n, duplicate = await self._call("append", lambda: self._append(keys=keys, args=args), gated=False)
        return Appended(int(n), bool(duplicate))

    async def ping(self) -> bool:
        """For /readyz: whether requests are reading Redis now. It goes through the breaker like a request: False
        without a round trip while the breaker is open, and in half-open it may be the probe, so a readiness poll
        closes the breaker of an idle service whose Redis came back."""
        try:
            return bool(await self._call("ping", self.client.ping))
        except StoreUnavailable:
            return False

    async def close(self) -> None:
        await self.client.aclose()
        await self.pool.aclose()


# KEYS: history list, its times (both newest first, one time per item), the seen event ids (sorted set scored by
# arrival, seconds), the profile hash. ARGV: max_len, n_seed, n_clicks, ttl_s (0: leave TTLs alone), event_id (""
# for none), window_s, id_max, then the seed's items then times (newest first, n_seed each), the clicks' items then
# times (oldest first, n_clicks each).
# A times list that does not match its history (written before times were kept) is rebuilt with zeros under the
# clicks', so the two stay aligned item for item.
# Arrival times come from Redis TIME, not the caller: every service process and host then judges the window on one
# clock, so host clock skew cannot make a retry look new (or an old id look recent). The seen set expires with the
# window (never later than ttl_s): past it every id in it is forgotten anyway, so it holds nothing worth keeping.
_APPEND_LUA = """
local key, tkey, skey, ukey = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local max_len, n_seed, n_clicks = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local ttl, event_id, window, id_max = tonumber(ARGV[4]), ARGV[5], tonumber(ARGV[6]), tonumber(ARGV[7])
local seed, clicks = 8, 8 + 2 * n_seed
local duplicate = 0
if event_id ~= '' then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
  redis.call('ZREMRANGEBYSCORE', skey, '-inf', now - window)
  if redis.call('ZSCORE', skey, event_id) then
    duplicate = 1
  else
    redis.call('ZADD', skey, now, event_id)
    redis.call('ZREMRANGEBYRANK', skey, 0, -id_max - 1)
  end
  if ttl > 0 and ttl < window then
    redis.call('EXPIRE', skey, ttl)
  else
    redis.call('EXPIRE', skey, window)
  end
end
if duplicate == 0 then
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
end
if ttl > 0 then
  redis.call('EXPIRE', key, ttl)
  redis.call('EXPIRE', tkey, ttl)
  redis.call('EXPIRE', ukey, ttl)
end
return {redis.call('LLEN', key), duplicate}
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
    row = bundle.row[user_id] if stored else None
    if redis_record is not None:
        live = {k: v for k, v in redis_record.profile.items() if k in bundle.columns and k != "user_id"}
        profile.update(live)
        known = known or bool(redis_record.profile) or redis_record.history is not None
        row = None if live else row
    if features:
        profile.update(features)
        known, row = True, None
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
    state = UserState(user_id, profile, hist, source, known or bool(hist), degraded, times, row)
    if state.popularity_only:
        state.degraded.append(POPULARITY_FALLBACK)
    return state
