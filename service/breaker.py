"""A circuit breaker: how the service stops paying a dependency's timeout on every request while it is down.

A fixed back-off after any single failure made one slow call degrade a whole second of traffic. The breaker opens
only after `failures` consecutive failures (one slow call degrades only its own request), keeps every call off the
dependency while open (requests are served degraded at once instead of each waiting out its timeout), and after
`open_s` lets exactly one caller probe: its success closes the breaker, its failure reopens it for another `open_s`.

It knows nothing about Redis, so its rules can be tested with a fake clock. It is meant for one event loop (no
locks): `allow` and the reports are plain synchronous calls between awaits.
"""

import time
from collections.abc import Callable
from typing import Literal

State = Literal["closed", "open", "half_open"]
CLOSED: State = "closed"
OPEN: State = "open"
HALF_OPEN: State = "half_open"


class CircuitBreaker:
    """Callers ask `allow()` before a call and report its outcome with `success()`, `failure()` or `abandon()`."""

    def __init__(
        self,
        failures: int,
        open_s: float,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[State], None] | None = None,
    ) -> None:
        if failures < 1:
            raise ValueError(f"failures must be >= 1, got {failures}")
        if open_s < 0:
            raise ValueError(f"open_s must be >= 0, got {open_s}")
        self.failures = failures
        self.open_s = open_s
        self.clock = clock
        self.on_change = on_change  # a metrics gauge follows transitions through it
        self._state: State = CLOSED
        self._consecutive = 0
        self._opened_at = 0.0
        self._probing = False  # half-open: the single probe is out

    @property
    def state(self) -> State:
        """closed | open | half_open; an open breaker reads half_open once `open_s` has passed, even before the
        next call, so /readyz and a gauge do not report a stale "open"."""
        self._tick()
        return self._state

    @property
    def consecutive_failures(self) -> int:
        return self._consecutive

    def allow(self) -> bool:
        """Whether this caller may call the dependency now. In half-open only the first caller is let through (the
        probe); everyone else is refused until it reports, so a dependency that is still down costs one timeout per
        `open_s`, not one per request."""
        self._tick()
        if self._state == CLOSED:
            return True
        if self._state == HALF_OPEN and not self._probing:
            self._probing = True
            return True
        return False

    def success(self) -> None:
        """Any answer proves the dependency is back: close and forget earlier failures (a call that started before
        the breaker opened and answers late counts too)."""
        self._consecutive = 0
        self._probing = False
        self._set(CLOSED)

    def failure(self) -> None:
        """A failed or timed-out call. Closed: the N-th in a row opens. Half-open: the dependency is still down,
        reopen for another `open_s`. Open: a late report from a call let through before the breaker opened; the
        open period is not extended by it."""
        self._tick()
        if self._state == OPEN:
            return
        self._consecutive += 1
        if self._state == HALF_OPEN or self._consecutive >= self.failures:
            self._open()

    def abandon(self) -> None:
        """The call ended without saying anything about the dependency (its caller was cancelled). A probe hands its
        turn back so the next caller probes; otherwise nothing changes."""
        self._probing = False

    def _open(self) -> None:
        self._opened_at = self.clock()
        self._probing = False
        self._set(OPEN)

    def _tick(self) -> None:
        if self._state == OPEN and self.clock() - self._opened_at >= self.open_s:
            self._probing = False
            self._set(HALF_OPEN)

    def _set(self, state: State) -> None:
        if state == self._state:
            return
        self._state = state
        if self.on_change is not None:
            self.on_change(state)
