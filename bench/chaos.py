"""Chaos benchmark (issue 15, item 7): a real `quiver-serve` and a real redis-server under a fixed arrival rate while
Redis is killed and stalled, index versions are published, and corrupt bundles are published, then a valid one.

Steps, in order, while /recall (--rate) and /events (--events-rate) arrive open-loop (request i due at t0 + i/rate,
whatever happened before; bench/loadgen.py's open loop, but every answer is parsed for its versions and flags):

    steady         warm-up (RSS baseline at its end), then plain load
    redis_down     SIGKILL redis-server, leave it down --down-s, restart it on the same port (--kills times)
    redis_stalled  a Lua script keeps Redis busy --stall-ms (--stalls times); other clients wait, nobody errors
    publishing     --publishes index versions through the project's upsert + publish path (CURRENT, Redis notify),
                   alternating between two model versions, so a mixed (model, index) answer would show
    corrupt        one corrupt bundle of each kind in CORRUPT_KINDS (a real LATEST/CURRENT flip each), then a valid one
    steady         the rest of --seconds

Every /events that does not get 200 is retried with the same event_id until it does. Each click carries a unique item
id, so at the end the stored histories (read from Redis) count clicks lost (acknowledged, absent) and duplicated.
Redis runs with appendfsync always: a Redis without persistence forgets every click on SIGKILL, which would measure
Redis's configuration, not the service.

    flock /tmp/quiver-cpu.lock .venv/bin/python bench/chaos.py                 # 120 s (prepares artifacts once)
    .venv/bin/python bench/chaos.py --quick --seconds 30                       # smoke run: fewer kills/stalls/publishes

Prints one JSON line (also <out>/runs/<time>/bench.json, beside server.log, redis.log and publisher.log). Exit codes:
0 measured (goals met or not: goal_met and goals), 2 something it needs is missing or broke (one line on stderr).
"""

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from multiprocessing import get_context
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
NAME = "chaos"  # model and index name (QUIVER_MODEL, QUIVER_INDEX)
CLICKS_PER_USER = 4  # far below the model's history length (20), so trimming never hides a stored click
REDIS_TIMEOUT_MS = 50.0  # the service default, restated: the grace around a down/stall window
CORRUPT_KINDS = (
    "model_weights_truncated",  # 1,000 bytes, checksum updated: the probe's 500 that killed the reload loops
    "model_checksum_mismatch",
    "model_manifest_not_json",
    "model_file_missing",
    "index_faiss_truncated",  # checksum updated
    "ids_wrong_length",  # checksum updated
    "index_unknown_model",
    "index_dim_mismatch",
    "index_file_missing",
)
TINY_DSSM = """# tests/conftest.py's tiny_config: trains in seconds
data: {{format: interactions, path: "{data}", train: interactions.parquet, users: users.parquet,
       items: items.parquet, max_seq_len: 20}}
features:
  user: [{{name: user_id, kind: id, embedding_dim: 8}}, {{name: region, kind: id}}]
  item: [{{name: item_id, kind: id, embedding_dim: 16}}, {{name: category, kind: id, embedding_dim: 8}},
         {{name: price, kind: dense}}]
  hist: [{{name: hist_item_id, kind: sequence, shared_with: item_id, embedding_dim: 16}}]
model: {{type: dssm, user_tower: {{hidden_units: [64]}}, item_tower: {{hidden_units: [64]}}, output_dim: 16,
        temperature: 0.1}}
negatives: {{mode: sampled, num: 128}}
train: {{epochs: 1, batch_size: 256, lr: 0.005, seed: {seed}, progress: false}}
output: {{root: "{models}", name: {name}}}
"""
STALL_LUA = """
local t = redis.call('TIME'); local t0 = t[1] * 1000000 + t[2]
repeat t = redis.call('TIME') until t[1] * 1000000 + t[2] - t0 >= tonumber(ARGV[1]) * 1000
return 1
"""


class BenchError(Exception):
    """Something the benchmark needs is missing or failed: one line, exit 2."""


def log(msg: str) -> None:
    from tqdm import tqdm

    tqdm.write(f"[chaos {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr)


def tool(name: str) -> str:
    """A console script of this venv (beside the running python), else on PATH."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        raise BenchError(f"{name}: not found beside {sys.executable} nor on PATH")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_tool(args: list[str], what: str) -> str:
    done = subprocess.run(args, capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        raise BenchError(f"{what} failed ({done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
    return done.stdout.strip().splitlines()[-1]


# ---------------------------------------------------------------- artifacts, prepared once with the project's CLIs


def prepare(prep: Path) -> dict[str, Any]:
    """Two small DSSM versions (seeds 0, 1) on the demo catalog and a Flat index for each, under one name; cached."""
    done = prep / "prepared.json"
    if done.is_file():
        return json.loads(done.read_text())
    shutil.rmtree(prep, ignore_errors=True)
    data, root = prep / "data", prep / "artifacts"
    log("preparing: demo data, two DSSM versions, their indexes")
    args = ["--users", "800", "--items", "1000", "--categories", "12", "--seed", "3"]
    run_tool([tool("quiver-train"), "demo-data", "--out", str(data), *args], "quiver-train demo-data")
    models, indexes = [], []
    for seed in (0, 1):
        path = prep / f"dssm-{seed}.yaml"
        path.write_text(TINY_DSSM.format(data=data, models=root / "models", name=NAME, seed=seed))
        models.append(Path(run_tool([tool("quiver-train"), "fit", "--config", str(path)], "quiver-train fit")).name)
        model = str(root / "models" / NAME / models[-1])
        args = f"--name {NAME} --index Flat --keep 10 --queries 200 --threads 1 --no-progress".split()
        out = run_tool(
            [tool("quiver-index"), "build", "--model", model, "--out", str(root / "indexes"), *args], "build"
        )
        indexes.append(json.loads(out)["version"])
    if models[0] == models[1]:
        raise BenchError("the two training seeds gave the same model version")
    info = {"models": models, "indexes": indexes}
    done.write_text(json.dumps(info))
    return info


# ---------------------------------------------------------------- publisher: its own process (torch, FAISS, I/O)


def publisher(conn: Connection, root: str, index_versions: list[str], redis_url: str, keep: int, logfile: str) -> None:
    """Publishes on request from the load process, so its CPU and imports never stall the load's event loop."""
    sys.stdout = sys.stderr = open(logfile, "a", buffering=1)  # noqa: SIM115  (the process's own log, for its life)
    import faiss
    import pyarrow as pa

    from index.bundle import IDS_FILE, INDEX_FILE, IndexBundle, load_index, write_files
    from index.options import PublishOptions, RunOptions
    from index.publish import commit as commit_index
    from index.upsert import upsert
    from models import publish as mpublish
    from models.bundle import LATEST, WEIGHTS, intact, load_bundle, sha256_file

    base = Path(root)
    parents = [load_index(base / "indexes" / NAME / v) for v in index_versions]
    bundles = [load_bundle(base / "models" / NAME / p.model_version) for p in parents]
    popts, run = PublishOptions(keep=keep, redis_url=redis_url), RunOptions(threads=1)

    def new_version(tag: str) -> str:
        return hashlib.sha256(f"{tag}-{time.time_ns()}".encode()).hexdigest()[:16]

    def valid(slot: int, n: int) -> str:
        """One new item on top of a pristine parent (an upsert changes a Flat index in place: work on a copy)."""
        p, src = parents[slot], bundles[slot].items.slice(n % bundles[slot].items.num_rows, 1)
        delta = src.set_column(src.column_names.index("item_id"), "item_id", pa.array([f"chaos-new-{n}"]))
        fresh = IndexBundle(p.path, p.manifest, faiss.clone_index(p.index), p.ids)
        return upsert(fresh, bundles[slot], delta, run, popts).version

    def corrupt_model(kind: str) -> str:
        """A copy of model 0 with one defect, published as LATEST; returns its version."""
        parent, version = base / "models" / NAME, new_version(kind)
        with mpublish.staging(parent) as tmp:
            shutil.copytree(bundles[0].path, tmp, dirs_exist_ok=True)
            manifest = json.loads((tmp / "manifest.json").read_text()) | {"version": version}
            text = json.dumps(manifest, indent=2)
            if kind == "model_weights_truncated":
                os.truncate(tmp / WEIGHTS, 1000)
                manifest["files"][WEIGHTS] = sha256_file(tmp / WEIGHTS)
                text = json.dumps(manifest, indent=2)
            elif kind == "model_checksum_mismatch":
                with (tmp / WEIGHTS).open("r+b") as f:
                    f.seek((tmp / WEIGHTS).stat().st_size // 2)
                    f.write(b"\xff" * 64)
            elif kind == "model_manifest_not_json":
                text = text[: len(text) // 2]
            elif kind == "model_file_missing":
                (tmp / "items.parquet").unlink()
            (tmp / "manifest.json").write_text(text)
            mpublish.commit(tmp, version, LATEST, intact, None)
        return version

    def corrupt(kind: str) -> tuple[str, str]:
        """An index bundle with one defect (or pointing at a defective model), published as CURRENT."""
        p = parents[0]
        model_version = corrupt_model(kind) if kind.startswith("model_") else p.model_version
        index, ids, version = p.index, p.ids, new_version(kind)
        manifest = {k: v for k, v in p.manifest.items() if k not in ("files", "created_at", "format", "kind")}
        manifest |= {"version": version, "model": {**p.manifest["model"], "version": model_version}}
        if kind == "index_unknown_model":
            manifest["model"]["version"] = "feedfacefeedface"
        elif kind == "ids_wrong_length":
            ids = ids[:-7]
        elif kind == "index_dim_mismatch":
            index = faiss.IndexIDMap2(faiss.IndexFlat(p.dim + 8, p.index.metric_type))
            rows = np.random.default_rng(0).standard_normal((len(ids), p.dim + 8)).astype(np.float32)
            index.add_with_ids(rows, np.arange(len(ids), dtype=np.int64))
            manifest["dim"] = p.dim + 8
        with mpublish.staging(base / "indexes" / NAME) as tmp:
            written = write_files(tmp, index, ids, manifest)
            if kind == "index_faiss_truncated":
                os.truncate(tmp / INDEX_FILE, 1000)
                written["files"][INDEX_FILE] = sha256_file(tmp / INDEX_FILE)
                (tmp / "manifest.json").write_text(json.dumps(written, indent=2, sort_keys=True))
            elif kind == "index_file_missing":
                (tmp / IDS_FILE).unlink()
            commit_index(tmp, version, popts)
        return version, str(manifest["model"]["version"])

    conn.send({"ready": [(p.model_version, p.version) for p in parents]})
    while True:
        msg = conn.recv()
        try:
            if msg[0] == "stop":
                return
            if msg[0] == "valid":
                version = valid(msg[1], msg[2])
                model_version = bundles[msg[1]].version
            else:
                version, model_version = corrupt(msg[1])
            conn.send({"version": version, "model_version": model_version, "t": time.monotonic()})
        except Exception as err:  # reported to the load process, which stops with it
            conn.send({"error": f"{type(err).__name__}: {err}"})


# ---------------------------------------------------------------- processes under test


class Redis:
    """A private redis-server on a free port that can be SIGKILLed and restarted on the same port and data dir."""

    def __init__(self, workdir: Path) -> None:
        server = shutil.which("redis-server")
        if server is None:
            raise BenchError("redis-server is not installed (make system-deps, or apt-get install redis-server)")
        self.port, self.workdir, self.server = free_port(), workdir, server
        self.proc: subprocess.Popen[bytes] | None = None
        workdir.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        flags = f"--port {self.port} --bind 127.0.0.1 --appendonly yes --appendfsync always".split()
        with (self.workdir / "redis.log").open("ab") as out:
            args = [self.server, *flags, "--save", "", "--dir", str(self.workdir)]
            self.proc = subprocess.Popen(args, stdout=out, stderr=out)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    async def wait_pong(self, timeout: float = 20.0) -> float:
        """Monotonic time of the first PONG (AOF loaded: a loading Redis answers -LOADING)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
                writer.write(b"PING\r\n")
                line = await asyncio.wait_for(reader.readline(), 1.0)
                writer.close()
                if line.startswith(b"+PONG"):
                    return time.monotonic()
            await asyncio.sleep(0.005)
        raise BenchError(f"redis-server on port {self.port} did not answer PING within {timeout:.0f} s")


def vm_rss_mb(pid: int) -> float | None:
    with contextlib.suppress(OSError):
        m = re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
        return int(m.group(1)) / 1024 if m else None
    return None


@dataclass
class Rec:
    kind: str  # recall | events
    phase: str
    sent: float
    done: float
    status: int  # 0: transport error
    versions: tuple[str, str] | None = None
    flagged: bool = False


# ---------------------------------------------------------------- the run


class Chaos:
    def __init__(self, args: argparse.Namespace, run_dir: Path, redis: Redis, port: int, token: str) -> None:
        self.args, self.run_dir, self.redis, self.token = args, run_dir, redis, token
        self.base = f"http://127.0.0.1:{port}"
        self.phase = "steady"
        self.recs: list[Rec] = []
        self.windows: list[tuple[float, float]] = []  # Redis really down or stalled
        self.ups: list[float] = []  # restarted Redis answered PING
        self.stall_ends: list[float] = []  # the busy script returned
        self.acked: set[int] = set()
        self.sent_events = 0
        self.unacked = 0
        self.stop_at = float("inf")
        self.pairs: set[tuple[str, str]] = set()  # (model, index) published together
        self.corrupt: dict[str, dict[str, Any]] = {}
        self.control_fail: Counter[str] = Counter()
        self.valid_ms: float | None = None
        self.rss_base: float | None = None  # after the warm-up
        self.rss: list[float] = []  # once a second, for the maximum
        self.tasks: set[asyncio.Task[None]] = set()

    async def post(self, client: Any, kind: str, path: str, body: dict[str, Any]) -> Rec:
        phase, sent = self.phase, time.monotonic()
        try:
            r = await client.post(path, json=body)
        except Exception:  # transport: refused, reset, timed out
            rec = Rec(kind, phase, sent, time.monotonic(), 0)
        else:
            rec = Rec(kind, phase, sent, time.monotonic(), r.status_code)
            if kind == "recall" and r.status_code == 200:
                a = r.json()
                rec.versions = (a["model_version"], a["index_version"])
                rec.flagged = "redis_unavailable" in (a.get("degraded") or "")
        self.recs.append(rec)
        return rec

    async def recall(self, client: Any, i: int, users: list[str]) -> None:
        await self.post(client, "recall", "/recall", {"user_id": users[i % len(users)], "k": 10})

    async def event(self, client: Any, i: int) -> None:
        body = {"user_id": f"cu{i // CLICKS_PER_USER}", "items": [f"ci{i}"], "event_id": f"ev{i}"}
        while (await self.post(client, "events", "/events", body)).status != 200:
            if time.monotonic() > self.stop_at + self.args.drain:
                self.unacked += 1
                return
            await asyncio.sleep(0.1)  # the same event_id again: a retry must store nothing twice
        self.acked.add(i)

    async def open_loop(self, rate: float, t0: float, fire: Any) -> int:
        i = 0
        while t0 + i / rate < self.stop_at:
            await asyncio.sleep(max(0.0, t0 + i / rate - time.monotonic()))
            task = asyncio.create_task(fire(i))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
            i += 1
        return i

    async def control(self, client: Any, method: str, path: str, ok: tuple[int, ...] = (200,)) -> dict[str, Any]:
        """/models, /readyz, /admin/reload: a failure here counts as a non-2xx too (409 is admin's refusal)."""
        try:
            r = await client.request(method, path, headers={"X-Quiver-Admin-Token": self.token})
        except Exception as err:
            self.control_fail[f"{path} {type(err).__name__}"] += 1
            return {"_status": 0}
        if r.status_code not in ok:
            self.control_fail[f"{path} {r.status_code}"] += 1
        try:
            body = r.json()
        except ValueError:
            body = {}
        return (body if isinstance(body, dict) else {}) | {"_status": r.status_code}

    async def served_index(self, client: Any) -> str | None:
        return (await self.control(client, "GET", "/models")).get("index", {}).get("version")

    async def publish(self, rpc: Any, msg: tuple[Any, ...]) -> dict[str, Any]:
        res = await asyncio.to_thread(rpc, msg)
        if "error" in res:
            raise BenchError(f"publisher: {msg[0]} {msg[1]}: {res['error']}")
        self.pairs.add((res["model_version"], res["version"]))
        return res

    async def scenario(self, ctl: Any, rpc: Any, pid: int) -> None:
        a = self.args
        await asyncio.sleep(a.warmup)
        self.rss_base = vm_rss_mb(pid)
        await asyncio.sleep(a.steady_s)
        self.phase = "redis_down"
        for n in range(a.kills):
            log(f"SIGKILL redis ({n + 1}/{a.kills})")
            start = time.monotonic()
            self.redis.kill()
            await asyncio.sleep(a.down_s)
            self.redis.start()
            up = await self.redis.wait_pong()
            self.windows.append((start, up))
            self.ups.append(up)
            await asyncio.sleep(a.after_s)
        self.phase = "redis_stalled"
        import redis.asyncio as aioredis

        stall = aioredis.Redis.from_url(self.redis.url, socket_timeout=10)
        for n in range(a.stalls):
            start = time.monotonic()
            await stall.eval(STALL_LUA, 0, a.stall_ms)
            self.windows.append((start, time.monotonic()))
            self.stall_ends.append(time.monotonic())
            log(f"stalled redis {1000 * (time.monotonic() - start):.0f} ms ({n + 1}/{a.stalls})")
            await asyncio.sleep(a.stall_gap_s)
        await stall.aclose()
        self.phase = "publishing"
        log(f"publishing {a.publishes} index versions")
        for n in range(a.publishes):
            t = time.monotonic()
            await self.publish(rpc, ("valid", n % 2, n))
            await asyncio.sleep(max(0.0, a.publish_every_s - (time.monotonic() - t)))
        await asyncio.sleep(a.poll_s + 1.0)
        self.phase = "corrupt"
        for kind in CORRUPT_KINDS:
            res = await self.publish(rpc, ("corrupt", kind))
            await asyncio.sleep(a.poll_s + a.slack_s)  # the poll and the listener have had their go
            served = await self.served_index(ctl)
            ready = await self.control(ctl, "GET", "/readyz")
            admin = await self.control(ctl, "POST", "/admin/reload", ok=(200, 409))
            refusal = ready.get("last_refusal") or {}
            self.corrupt[res["version"]] = {
                "kind": kind,
                "served": served == res["version"] or admin.get("index_version") == res["version"],
                "admin_status": admin["_status"],
                "admin": admin.get("status"),
                "refusal": str(refusal.get("reason"))[:200] if refusal else None,
            }
            log(f"corrupt {kind}: admin {admin['_status']} {admin.get('status')}")
        res = await self.publish(rpc, ("valid", 0, 10_000))
        deadline = res["t"] + a.poll_s + 5.0
        while time.monotonic() < deadline:
            if await self.served_index(ctl) == res["version"]:
                self.valid_ms = 1000 * (time.monotonic() - res["t"])
                break
            await asyncio.sleep(0.02)
        log(f"valid publish after the corrupt ones served after {self.valid_ms} ms")
        self.phase = "steady"

    async def run(self, rpc: Any, pid: int, users: list[str]) -> None:
        import httpx
        from tqdm import tqdm

        a = self.args
        limits = httpx.Limits(max_connections=128, max_keepalive_connections=128)
        async with (
            httpx.AsyncClient(base_url=self.base, limits=limits, timeout=10.0) as client,
            httpx.AsyncClient(base_url=self.base, timeout=30.0) as ctl,
        ):
            t0 = time.monotonic() + 0.05
            loops = asyncio.gather(
                self.open_loop(a.rate, t0, lambda i: self.recall(client, i, users)),
                self.open_loop(a.events_rate, t0, lambda i: self.event(client, i)),
            )
            bar = tqdm(total=int(a.seconds), unit="s", file=sys.stderr, dynamic_ncols=True)

            async def ticker() -> None:
                while not loops.done():
                    await asyncio.sleep(1.0)
                    bar.update(1)
                    bad = Counter(r.kind for r in self.recs if r.status != 200)
                    bar.set_postfix(
                        phase=self.phase, requests=len(self.recs), recall_fail=bad["recall"], retries=bad["events"]
                    )
                    self.rss.append(vm_rss_mb(pid) or 0.0)

            tick = asyncio.create_task(ticker())
            try:
                await self.scenario(ctl, rpc, pid)
            except BaseException:  # stop the load quietly, then report what broke
                for t in (loops, tick, *self.tasks):
                    t.cancel()
                await asyncio.gather(loops, tick, *self.tasks, return_exceptions=True)
                bar.close()
                raise
            self.stop_at = max(t0 + a.seconds, time.monotonic() + a.tail_s)
            recalls, self.sent_events = await loops
            await asyncio.gather(*self.tasks)
            tick.cancel()
            bar.close()
            log(f"load done: {recalls} /recall, {self.sent_events} /events scheduled")

    def clicks(self) -> dict[str, int]:
        import redis

        client = redis.Redis.from_url(self.redis.url, decode_responses=True)
        pipe = client.pipeline(transaction=False)
        for u in range((self.sent_events + CLICKS_PER_USER - 1) // CLICKS_PER_USER):
            pipe.lrange(f"quiver:hist:cu{u}", 0, -1)
        stored = Counter(int(x[2:]) for hist in pipe.execute() for x in hist if x.startswith("ci"))
        client.close()
        return {
            "acknowledged": len(self.acked),
            "stored": len(stored),
            "lost": len(self.acked - set(stored)),
            "duplicated": sum(n - 1 for n in stored.values() if n > 1),
            "stored_unacknowledged": len(set(stored) - self.acked),
            "unacknowledged": self.unacked,
        }

    def in_window(self, r: Rec, grace: float) -> bool:
        return any(r.sent <= end + grace and r.done >= start for start, end in self.windows)

    def report(self, rss_end: float | None) -> dict[str, Any]:
        a = self.args
        grace = a.grace_ms / 1000.0
        recalls = [r for r in self.recs if r.kind == "recall"]
        # /events answers 503 "not stored, retry" while Redis is really away: the documented answer, retried
        expected = {id(r) for r in self.recs if r.kind == "events" and r.status == 503 and self.in_window(r, grace)}
        bad = [r for r in self.recs if r.status // 100 != 2 and id(r) not in expected]
        by: Counter[str] = Counter(f"{r.kind} {r.status} {r.phase}" for r in bad)
        by.update(self.control_fail)
        phases: dict[str, dict[str, Any]] = {}
        for ph in ("steady", "redis_down", "redis_stalled", "publishing", "corrupt"):
            rs = [r for r in recalls if r.phase == ph]
            ok = [r for r in rs if r.status == 200]
            lat = [1000 * (r.done - r.sent) for r in ok]
            phases[ph] = {
                "requests": sum(r.phase == ph for r in self.recs),
                "non_2xx": sum(r.phase == ph for r in bad),
                "flagged_frac": round(sum(r.flagged for r in ok) / len(ok), 4) if ok else None,
                "recall_p99_ms": round(float(np.percentile(lat, 99)), 1) if lat else None,
            }
        flagged = [r for r in recalls if r.flagged]
        outside = [r for r in flagged if not self.in_window(r, grace)]

        def recovery_ms(up: float) -> float | None:
            after = [r.done for r in recalls if r.status == 200 and not r.flagged and r.done >= up]
            return round(1000 * (min(after) - up), 1) if after else None

        recovery = [recovery_ms(up) for up in self.ups]
        mixed = Counter(r.versions for r in recalls if r.versions and r.versions not in self.pairs)
        corrupt_served = {r.versions[1] for r in recalls if r.versions and r.versions[1] in self.corrupt}
        refused = sum(
            not c["served"] and v not in corrupt_served and c["admin_status"] == 409 for v, c in self.corrupt.items()
        )
        clicks = self.clicks()
        base = self.rss_base
        growth = round(100 * (rss_end - base) / base, 2) if base and rss_end else None
        rec_max = None if None in recovery or not recovery else max(recovery)
        out: dict[str, Any] = {
            "requests": len(self.recs),
            "non_2xx": len(bad) + sum(self.control_fail.values()),
            "mixed_versions": sum(mixed.values()),
            "clicks_lost": clicks["lost"],
            "clicks_duplicated": clicks["duplicated"],
            "corrupt_total": len(self.corrupt),
            "corrupt_refused": refused,
            "valid_after_corrupt_served": self.valid_ms is not None and self.valid_ms <= 1000 * (a.poll_s + a.slack_s),
            "recovery_ms": rec_max,
            "rss_growth_pct": growth,
        }
        goals = {
            "non_2xx": out["non_2xx"] == 0,
            "mixed_versions": out["mixed_versions"] == 0,
            "clicks": clicks["lost"] == 0 and clicks["duplicated"] == 0,
            "corrupt_refused": refused == len(self.corrupt) == len(CORRUPT_KINDS),
            "valid_after_corrupt_served": out["valid_after_corrupt_served"],
            "recovery_ms": rec_max is not None and rec_max <= a.goal_recovery_ms,
            "flagged_only_when_redis_down": not outside,
            "rss_growth_pct": growth is not None and growth <= a.goal_rss_pct,
        }
        return out | {
            "goal_met": all(goals.values()),
            "goals": goals,
            "non_2xx_by": dict(by.most_common(20)),
            "events_503_while_redis_down": len(expected),
            "flagged": len(flagged),
            "flagged_outside_windows": len(outside),
            "flagged_outside_frac": round(len(outside) / len(flagged), 4) if flagged else 0.0,
            "phases": phases,
            "recovery_ms_each": recovery,
            "stall_recovery_ms_each": [recovery_ms(end) for end in self.stall_ends],
            "clicks": clicks,
            "mixed_pairs": [list(p) for p, _ in mixed.most_common(5)],
            "corrupt_served_by_recall": sorted(corrupt_served),
            "corrupt": {
                c["kind"]: {k: v for k, v in c.items() if k != "kind"} | {"version": v} for v, c in self.corrupt.items()
            },
            "valid_after_corrupt_ms": round(self.valid_ms, 1) if self.valid_ms is not None else None,
            "published_pairs": len(self.pairs),
            "rss_mb_start": round(base, 1) if base else None,
            "rss_mb_end": round(rss_end, 1) if rss_end else None,
            "rss_mb_max": round(max(self.rss), 1) if self.rss else None,
            "windows_ms": [round(1000 * (e - s)) for s, e in self.windows],
            "grace_ms": round(1000 * grace, 1),
        }


def metrics_lines(base: str) -> dict[str, float]:
    """quiver_reloads_total and quiver_reload_loop_errors_total, by label."""
    import httpx

    with contextlib.suppress(Exception):
        text = httpx.get(f"{base}/metrics", timeout=10).text
        pat = r"^(quiver_reloads_total|quiver_reload_loop_errors_total)\{(.*?)\} ([0-9.e+]+)$"
        return {f"{m[1]}{{{m[2]}}}": float(m[3]) for m in re.finditer(pat, text, re.M)}
    return {}


def wait_ready(base: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"quiver-serve exited with {proc.returncode} before /readyz (see server.log)")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    raise BenchError(f"quiver-serve: /readyz not 200 within {timeout:.0f} s (see server.log)")


def measure(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out)
    prep = prepare(out / "prep")
    run_dir = out / "runs" / time.strftime("%Y%m%d-%H%M%S")
    root = run_dir / "artifacts"
    shutil.copytree(out / "prep" / "artifacts", root)  # every run starts from the same two published versions
    import pyarrow.parquet as pq

    users = [str(u) for u in pq.read_table(out / "prep" / "data" / "users.parquet", columns=["user_id"])[0].to_pylist()]
    users = [u for pair in zip(users, [f"cu{n}" for n in range(len(users))], strict=True) for u in pair]
    redis = Redis(run_dir / "redis")
    redis.start()
    port, token = args.port or free_port(), hashlib.sha256(os.urandom(16)).hexdigest()[:24]
    env = os.environ | {
        "QUIVER_ARTIFACTS": str(root),
        "QUIVER_MODEL": NAME,
        "QUIVER_INDEX": NAME,
        "QUIVER_REDIS_URL": redis.url,
        "QUIVER_REDIS_TIMEOUT_MS": str(REDIS_TIMEOUT_MS),
        "QUIVER_ADMIN_TOKEN": token,
        "QUIVER_RELOAD_POLL_S": str(args.poll_s),
        "QUIVER_HOST": "127.0.0.1",
        "QUIVER_PORT": str(port),
        "QUIVER_TORCH_THREADS": "1",
    }
    server: subprocess.Popen[bytes] | None = None
    worker = None
    parent_conn, child_conn = get_context("spawn").Pipe()
    try:
        asyncio.run(redis.wait_pong())
        with (run_dir / "server.log").open("ab") as slog:
            server = subprocess.Popen([tool("quiver-serve")], env=env, stdout=slog, stderr=slog, start_new_session=True)
        worker = get_context("spawn").Process(
            target=publisher,
            args=(child_conn, str(root), prep["indexes"], redis.url, args.keep, str(run_dir / "publisher.log")),
            daemon=True,
        )
        worker.start()
        if not parent_conn.poll(300) or "ready" not in (hello := parent_conn.recv()):
            raise BenchError("publisher process did not start (see publisher.log)")
        chaos = Chaos(args, run_dir, redis, port, token)
        chaos.pairs |= {tuple(p) for p in hello["ready"]}
        wait_ready(chaos.base, server, args.startup_timeout)
        log(f"serving on {chaos.base}, redis on {redis.port}; run dir {run_dir}")

        def rpc(msg: tuple[Any, ...]) -> dict[str, Any]:
            try:
                parent_conn.send(msg)
                return parent_conn.recv()
            except (EOFError, OSError) as err:
                raise BenchError(f"publisher process died ({err!r}; see publisher.log)") from None

        started = time.monotonic()
        asyncio.run(chaos.run(rpc, server.pid, users))
        rss_end = vm_rss_mb(server.pid)
        result = chaos.report(rss_end) | {
            "reload_metrics": metrics_lines(chaos.base),
            "seconds": round(time.monotonic() - started, 1),
            "rate": args.rate,
            "events_rate": args.events_rate,
            "poll_s": args.poll_s,
            "quick": args.quick,
            "server_alive": server.poll() is None,
            "date": time.strftime("%Y-%m-%d %H:%M"),
            "run_dir": str(run_dir),
        }
    finally:
        if worker is not None and worker.is_alive():
            with contextlib.suppress(OSError):
                parent_conn.send(("stop",))
            worker.join(10)
            if worker.is_alive():
                worker.kill()
        if server is not None and server.poll() is None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(15)
            except subprocess.TimeoutExpired:
                server.kill()
        redis.kill()
    (run_dir / "bench.json").write_text(json.dumps(result, indent=2))
    return result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=120.0, help="load at least this long (>= 120 unless --quick)")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 kill, 2 stalls, 5 publishes, any --seconds")
    p.add_argument("--rate", type=float, default=100.0, help="/recall per second (fixed arrival rate)")
    p.add_argument("--events-rate", type=float, default=20.0, help="/events per second, one click each")
    p.add_argument("--out", default="/tmp/quiver-chaos", help="prepared artifacts (cached) and runs/<time>/")
    p.add_argument("--port", type=int, default=None, help="service port (default: a free one)")
    p.add_argument("--poll-s", type=float, default=1.0, help="QUIVER_RELOAD_POLL_S")
    p.add_argument("--slack-s", type=float, default=1.0, help="a valid publish must be served within poll + this")
    p.add_argument("--warmup", type=float, default=5.0, help="load before the RSS baseline")
    p.add_argument("--steady-s", type=float, default=10.0)
    p.add_argument("--kills", type=int, default=None, help="Redis SIGKILLs (default 2, --quick 1)")
    p.add_argument(
        "--down-s",
        type=float,
        default=2.5,
        help="how long a killed Redis stays down (not a multiple of the breaker's 1 s, whose probes would then meet "
        "the restart by construction)",
    )
    p.add_argument("--after-s", type=float, default=4.0, help="load after each restart before the next step")
    p.add_argument("--stalls", type=int, default=None, help="busy-script stalls (default 5, --quick 2)")
    p.add_argument("--stall-ms", type=int, default=300)
    p.add_argument("--stall-gap-s", type=float, default=2.0)
    p.add_argument("--publishes", type=int, default=None, help="index versions published (default 30, --quick 5)")
    p.add_argument("--publish-every-s", type=float, default=0.8)
    p.add_argument("--keep", type=int, default=3, help="index versions kept by each publish (quiver-index's default)")
    p.add_argument("--tail-s", type=float, default=3.0, help="load after the last step, at least")
    p.add_argument("--drain", type=float, default=15.0, help="keep retrying unacknowledged /events this long")
    p.add_argument("--grace-ms", type=float, default=2 * REDIS_TIMEOUT_MS, help="around a down/stall window")
    p.add_argument("--goal-recovery-ms", type=float, default=100.0)
    p.add_argument("--goal-rss-pct", type=float, default=5.0)
    p.add_argument("--startup-timeout", type=float, default=180.0)
    args = p.parse_args(argv)
    if args.seconds < 120 and not args.quick:
        p.error("--seconds must be >= 120 (the issue's minimum); --quick for a shorter smoke run")
    if args.rate <= 0 or args.events_rate <= 0:
        p.error("--rate and --events-rate must be > 0")
    for name, full, quick in (("kills", 2, 1), ("stalls", 5, 2), ("publishes", 30, 5)):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        for name in ("quiver-serve", "quiver-train", "quiver-index"):
            tool(name)
        if shutil.which("redis-server") is None:
            raise BenchError("redis-server is not installed (make system-deps, or apt-get install redis-server)")
        result = measure(args)
    except BenchError as err:
        print(f"chaos: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
