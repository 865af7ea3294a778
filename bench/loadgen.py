"""A minimal HTTP/1.1 load generator for bench/serve.py: asyncio streams, keep-alive, N connections, one JSON line.

Run in its own process, beside the server it measures, so that its CPU shows up as its own (the two share the
machine's cores). It is deliberately lean: request bytes are built once, a response is read as status line + headers
+ Content-Length body (chunked bodies are understood too) and never parsed, so the client costs a fraction of what
an HTTP library would.

    closed loop (saturation): every connection sends its next request as soon as the previous answer arrived;
        `rps` = answers completed inside the measured window / its length.
    open loop (fixed arrival rate): request i is due at t0 + i / rate whatever happened before; a free connection
        takes the next due request, waits for its time and sends it. Latency runs from the *scheduled* time to the
        last body byte, so time spent waiting for a free connection (queueing) counts (no coordinated omission);
        `send_lag_ms` says how late sends left (timer granularity and busy connections). With --windows N the
        measured span is cut into N consecutive windows of equal length by scheduled time (the load never pauses
        between them) and each window's latency percentiles are reported too (`windows`).

Bodies rotate through a JSON-lines file (one request body per line). Non-2xx answers and transport failures are
errors, counted and reported, never timed as successes.

    python bench/loadgen.py --url http://127.0.0.1:8000/recall --bodies bodies.jsonl --mode closed --seconds 10
    python bench/loadgen.py --url ... --bodies ... --mode open --rate 400 --seconds 10
"""

import argparse
import asyncio
import json
import os
import resource
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

IDLE_RECONNECT_S = 4.0  # uvicorn closes keep-alive connections idle for 5 s: reconnect before it does
# A request that failed in transport (refused, reset, cut short, unparseable head): counted by type, never timed.
TRANSPORT_ERRORS = (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError)


class Conn:
    """One keep-alive HTTP/1.1 connection, one request in flight at a time."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.last_used = 0.0

    async def connect(self) -> None:
        self.close()
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.last_used = time.perf_counter()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def request(self, data: bytes) -> tuple[int, int]:
        """Send one request, read the whole answer: (status, body bytes)."""
        if self.writer is None or time.perf_counter() - self.last_used > IDLE_RECONNECT_S:
            await self.connect()
        assert self.reader is not None and self.writer is not None
        self.writer.write(data)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        lower = head.lower()
        i = lower.find(b"\r\ncontent-length:")
        if i >= 0:
            n = int(lower[i + 17 : lower.index(b"\r\n", i + 2)])
            if n:
                await self.reader.readexactly(n)
        elif b"\r\ntransfer-encoding: chunked" in lower:
            n = 0
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                await self.reader.readexactly(size + 2)  # the chunk and its CRLF
                n += size
                if size == 0:
                    break
        else:  # no length: the body ends with the connection
            n = len(await self.reader.read())
            self.close()
        if b"\r\nconnection: close" in lower:
            self.close()
        self.last_used = time.perf_counter()
        return status, n


def build_requests(url: str, bodies: list[bytes]) -> tuple[str, int, list[bytes]]:
    u = urlsplit(url)
    if u.scheme != "http" or not u.hostname:
        raise SystemExit(f"loadgen: only http://host:port/path URLs, got {url!r}")
    port = u.port or 80
    path = u.path or "/"
    host = f"{u.hostname}:{port}"
    out = [
        (
            f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(b)}\r\n\r\n"
        ).encode()
        + b
        for b in bodies
    ]
    return u.hostname, port, out


def tree_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of a process and its descendants (Linux /proc), None if it is gone."""
    tick = os.sysconf("SC_CLK_TCK")
    total, todo, seen = 0.0, [pid], set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
            for task in Path(f"/proc/{p}/task").iterdir():
                kids = (task / "children").read_text().split()
                todo.extend(int(k) for k in kids)
        except (OSError, IndexError, ValueError):
            if p == pid:
                return None
    return total


def machine_cpu() -> tuple[float, float, float] | None:
    """Whole-machine CPU seconds from /proc/stat: (busy, steal, all); None off Linux. busy excludes idle, iowait and
    steal; steal is time the hypervisor gave this VM's CPUs to someone else."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    tick = os.sysconf("SC_CLK_TCK")
    busy = user + nice + system + irq + softirq
    return busy / tick, steal / tick, sum(fields) / tick


def own_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def percentile(ms: list[float], q: float) -> float | None:
    """The measured value nearest the q-th percentile (never an interpolation between two answers)."""
    return round(float(np.percentile(ms, q, method="nearest")), 3) if ms else None


def latency_summary(ms: list[float]) -> dict[str, Any]:
    return {
        "p50_ms": percentile(ms, 50),
        "p90_ms": percentile(ms, 90),
        "p99_ms": percentile(ms, 99),
        "max_ms": round(max(ms), 3) if ms else None,
        "mean_ms": round(float(np.mean(ms)), 3) if ms else None,
    }


def non_2xx(statuses: Counter[str]) -> int:
    return sum(n for status, n in statuses.items() if not status.startswith("2"))


class Window:
    """CPU accounting over the measured window (client and, with --pid, the server's process tree)."""

    def __init__(self, pid: int | None) -> None:
        self.pid = pid
        self.t0 = self.t1 = 0.0
        self.client0 = self.client1 = 0.0
        self.server0: float | None = None
        self.server1: float | None = None
        self.machine0: tuple[float, float, float] | None = None
        self.machine1: tuple[float, float, float] | None = None

    def start(self) -> None:
        self.t0, self.client0 = time.perf_counter(), own_cpu_s()
        self.server0 = tree_cpu_s(self.pid) if self.pid else None
        self.machine0 = machine_cpu()

    def stop(self) -> None:
        self.t1, self.client1 = time.perf_counter(), own_cpu_s()
        self.server1 = tree_cpu_s(self.pid) if self.pid else None
        self.machine1 = machine_cpu()

    def cpu(self, answers: int) -> dict[str, Any]:
        span = max(self.t1 - self.t0, 1e-9)
        out: dict[str, Any] = {"client_cpu_pct": round(100 * (self.client1 - self.client0) / span, 1)}
        if self.server0 is not None and self.server1 is not None:
            used = self.server1 - self.server0
            out["server_cpu_pct"] = round(100 * used / span, 1)
            out["server_cpu_ms_per_req"] = round(1000 * used / answers, 3) if answers else None
        if self.machine0 is not None and self.machine1 is not None:
            # every CPU of the machine, in % of one core: what the rest of the machine used beside the server and
            # this client (other processes: the shared machine's noise), and the hypervisor's steal
            busy, steal = (self.machine1[i] - self.machine0[i] for i in (0, 1))
            out["machine_busy_pct"] = round(100 * busy / span, 1)
            out["steal_pct"] = round(100 * steal / span, 1)
            if "server_cpu_pct" in out:
                rest = out["machine_busy_pct"] - out["server_cpu_pct"] - out["client_cpu_pct"]
                out["others_cpu_pct"] = round(max(0.0, rest), 1)
        return out


async def closed_loop(
    host: str, port: int, reqs: list[bytes], connections: int, warmup: float, seconds: float, pid: int | None
) -> dict[str, Any]:
    start = time.perf_counter()
    t_measure, t_end = start + warmup, start + warmup + seconds
    lat: list[float] = []
    statuses: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    body_bytes: int | None = None  # of the first measured answer
    counter = 0
    window = Window(pid)

    async def worker(w: int) -> None:
        nonlocal counter, body_bytes
        conn = Conn(host, port)
        try:
            while True:
                now = time.perf_counter()
                if now >= t_end:
                    return
                data = reqs[counter % len(reqs)]
                counter += 1
                try:
                    status, n = await conn.request(data)
                except TRANSPORT_ERRORS as err:
                    done = time.perf_counter()
                    if t_measure <= done < t_end:
                        errors[type(err).__name__] += 1
                    conn.close()
                    await asyncio.sleep(0.01)  # do not spin on a dead server
                    continue
                done = time.perf_counter()
                if t_measure <= done < t_end:
                    statuses[str(status)] += 1
                    if 200 <= status < 300:
                        lat.append((done - now) * 1000.0)
                        if body_bytes is None:
                            body_bytes = n
        finally:
            conn.close()

    async def timer() -> None:
        await asyncio.sleep(max(0.0, t_measure - time.perf_counter()))
        window.start()
        await asyncio.sleep(max(0.0, t_end - time.perf_counter()))
        window.stop()

    await asyncio.gather(timer(), *(worker(w) for w in range(connections)))
    ok = len(lat)
    non2xx = non_2xx(statuses)
    return {
        "mode": "closed",
        "connections": connections,
        "warmup_s": warmup,
        "seconds": seconds,
        "rps": round(ok / seconds, 1),
        "answers": ok,
        "errors": non2xx + sum(errors.values()),
        "statuses": dict(statuses),
        "transport_errors": dict(errors),
        "body_bytes": body_bytes,
        **latency_summary(lat),
        **window.cpu(ok + non2xx),
    }


async def open_loop(
    host: str,
    port: int,
    reqs: list[bytes],
    connections: int,
    warmup: float,
    seconds: float,
    rate: float,
    drain: float,
    pid: int | None,
    windows: int = 1,
) -> dict[str, Any]:
    total = int(rate * (warmup + seconds))
    first_measured = int(rate * warmup)
    measured_n = max(1, total - first_measured)
    lat: list[float] = []  # scheduled time -> last byte
    by_window: list[list[float]] = [[] for _ in range(windows)]  # the same latencies, by scheduled window
    service: list[float] = []  # actual send -> last byte
    lag: list[float] = []  # actual send - scheduled time
    statuses: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    nxt = 0
    window = Window(pid)
    conns = [Conn(host, port) for _ in range(connections)]
    for c in conns:  # connect up front, so the first requests do not pay for it
        await c.connect()
    t0 = time.perf_counter() + 0.05

    async def worker(conn: Conn) -> None:
        nonlocal nxt
        while nxt < total:
            i = nxt
            nxt += 1
            due = t0 + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            sent = time.perf_counter()
            try:
                status, _ = await conn.request(reqs[i % len(reqs)])
            except TRANSPORT_ERRORS as err:
                if i >= first_measured:
                    errors[type(err).__name__] += 1
                conn.close()
                continue
            done = time.perf_counter()
            if i >= first_measured:
                statuses[str(status)] += 1
                if 200 <= status < 300:
                    # A timer may fire up to half a millisecond early (the loop rounds to ms): then count from the
                    # actual send, never less than the service time.
                    lat.append((done - min(due, sent)) * 1000.0)
                    by_window[min(windows - 1, (i - first_measured) * windows // measured_n)].append(lat[-1])
                    service.append((done - sent) * 1000.0)
                    lag.append((sent - due) * 1000.0)
        conn.close()

    async def timer() -> None:
        await asyncio.sleep(max(0.0, t0 + first_measured / rate - time.perf_counter()))
        window.start()
        await asyncio.sleep(max(0.0, t0 + total / rate - time.perf_counter()))
        window.stop()

    tasks = [asyncio.ensure_future(worker(c)) for c in conns]
    await timer()
    _, pending = await asyncio.wait(tasks, timeout=drain)  # answers still outstanding after `drain` s are errors
    for t in pending:
        t.cancel()
    unanswered = total - nxt + len(pending)
    if pending:
        errors["unanswered"] += unanswered
    measured = total - first_measured
    ok = len(lat)
    non2xx = non_2xx(statuses)
    return {
        "mode": "open",
        "connections": connections,
        "warmup_s": warmup,
        "seconds": seconds,
        "rate": round(rate, 1),
        "scheduled": measured,
        "answers": ok,
        "achieved_rps": round(ok / seconds, 1),
        "errors": non2xx + sum(errors.values()),
        "statuses": dict(statuses),
        "transport_errors": dict(errors),
        **latency_summary(lat),
        "service_p50_ms": percentile(service, 50),
        "service_p99_ms": percentile(service, 99),
        "send_lag_p50_ms": percentile(lag, 50),
        "send_lag_p99_ms": percentile(lag, 99),
        **window.cpu(ok + non2xx),
        **(
            {"windows": [{"answers": len(w), "seconds": seconds / windows, **latency_summary(w)} for w in by_window]}
            if windows > 1
            else {}
        ),
    }


def read_bodies(path: str) -> list[bytes]:
    bodies = [line.strip().encode() for line in Path(path).read_text().splitlines() if line.strip()]
    if not bodies:
        raise SystemExit(f"loadgen: {path}: no request bodies")
    json.loads(bodies[0])  # a broken file fails here, not as a stream of 422s
    return bodies


def run(args: argparse.Namespace) -> dict[str, Any]:
    host, port, reqs = build_requests(args.url, read_bodies(args.bodies))
    try:
        import uvloop  # the cheaper event loop, when installed

        runner = uvloop.run
        loop_name = "uvloop"
    except ImportError:
        runner = asyncio.run
        loop_name = "asyncio"
    if args.mode == "closed":
        coro = closed_loop(host, port, reqs, args.connections, args.warmup, args.seconds, args.pid)
    else:
        if not args.rate or args.rate <= 0:
            raise SystemExit("loadgen: --mode open needs --rate > 0")
        coro = open_loop(
            host, port, reqs, args.connections, args.warmup, args.seconds, args.rate, args.drain, args.pid, args.windows
        )
    out = runner(coro)
    out["url"] = args.url
    out["client_loop"] = loop_name
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", required=True, help="http://host:port/path (POST)")
    p.add_argument("--bodies", required=True, help="JSON-lines file of request bodies, used in rotation")
    p.add_argument("--mode", choices=("closed", "open"), default="closed")
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--seconds", type=float, default=10.0, help="measured window")
    p.add_argument("--warmup", type=float, default=2.0, help="load before the measured window, not counted")
    p.add_argument("--rate", type=float, default=None, help="open loop: requests per second")
    p.add_argument("--drain", type=float, default=10.0, help="open loop: wait this long for the last answers")
    p.add_argument("--pid", type=int, default=None, help="server process: report its CPU use over the window")
    p.add_argument(
        "--windows", type=int, default=1, help="open loop: also report latency per window (the span cut in N)"
    )
    args = p.parse_args(argv)
    if args.connections < 1 or args.seconds <= 0 or args.warmup < 0 or args.windows < 1:
        p.error("--connections >= 1, --seconds > 0, --warmup >= 0, --windows >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    print(json.dumps(run(parse_args(argv))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
