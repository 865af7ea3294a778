"""Serving benchmark (DESIGN §8, issue #6): /recall through a real uvicorn process over a 1M-item HNSW index, beside a
bare FastAPI endpoint answering a same-size JSON body (the framework floor), measured in the same run.

For each endpoint a load generator in its own process (bench/loadgen.py: asyncio, raw HTTP/1.1 keep-alive) measures
requests/s at saturation (closed loop, --connections connections) and then p50/p99 latency at --load (default 50%) of
that rate (open loop: fixed arrival rate, latency from each request's scheduled send time to its last byte, so
queueing counts). Endpoints: `/recall` k=100, `/recall` k=100 with `rerank` (the service retrieves
QUIVER_RERANK_CANDIDATES = 200 candidates and reorders them by the TDM ranker), each with micro-batching on (the
service default) and off, and the floor (bench/serve_floor.py, measured twice: between and after the service runs).
Goals on the 2-core dev machine: rps_recall >= 0.70x rps_floor (`ratio`), p99 <= 10 ms at half load.

Data (prepared once, cached under --out/ keyed by the settings, see `Layout`; a rerun reuses them): the synthetic
demo catalog (`quiver-train demo-data`) at 1M items, a DSSM retriever trained briefly on it (configs/dssm_demo.yaml,
one epoch at most, item_id hashed so that never-clicked items get distinct vectors), an HNSW32,Flat index over all
items (`quiver-index build`, recall measured against exact search, served at --ef-search) and a TDM ranker (the
configs/tdm_demo.yaml shape, a capped number of clicks, popularity negatives only). The models are trained for
speed measurement only: their quality is not the point and the JSON says so.

    flock /tmp/quiver-cpu.lock .venv/bin/python bench/serve.py                  # prepare (first run) + measure
    .venv/bin/python bench/serve.py --prepare-only                              # only build the artifacts
    .venv/bin/python bench/serve.py --skip-prepare --seconds 5                  # quick, cached artifacts required
    .venv/bin/python bench/serve.py --floor-only --seconds 5                    # loadgen vs the floor, no service

Prints one JSON line (also written to <artifacts root>/runs/<time>/bench.json beside the server logs). Exit codes:
0 measured (goals met or not: see goal_*), 2 something it needs is missing or broke (message on stderr).
"""

import argparse
import hashlib
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from index.factory import HNSW_EF_CONSTRUCTION
from models.bundle import resolve_version
from models.errors import QuiverError

REPO = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent
GOAL_RATIO = 0.70
GOAL_P99_MS = 10.0
DSSM, TDM = "dssm", "tdm"  # bundle names under <root>/models (the ranker's and the index's get a key suffix)


class BenchError(Exception):
    """Something the benchmark needs is missing or failed: one line, exit 2."""


def log(msg: str) -> None:
    print(f"[serve-bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    d = p.add_argument_group("data (part of the cache key)")
    d.add_argument("--items", type=int, default=1_000_000)
    d.add_argument("--users", type=int, default=10_000)
    d.add_argument("--categories", type=int, default=24)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--index", default="HNSW32,Flat", help="FAISS factory string of the served index")
    d.add_argument(
        "--item-buckets",
        type=int,
        default=1 << 20,
        help="DSSM item_id as a hash feature with this many buckets (0: the demo's training vocabulary)",
    )
    d.add_argument(
        "--ef-search",
        type=int,
        default=384,
        help="HNSW efSearch served (0: let quiver-index tune it to --recall-floor; the briefly trained model's "
        "near-duplicate item vectors keep HNSW32 below 0.95 even at 2048, so the default is the index benchmark's "
        "setting for recall 0.96 on clustered 1M-item vectors, and the recall reached here is reported)",
    )
    d.add_argument(
        "--ef-construction", type=int, default=HNSW_EF_CONSTRUCTION, help="HNSW build breadth (quiver-index's default)"
    )
    d.add_argument("--recall-floor", type=float, default=0.95, help="index build's recall@100 floor")
    d.add_argument("--train-minutes", type=float, default=3.0, help="DSSM training cap (after the epoch crossing it)")
    d.add_argument("--tdm-clicks", type=int, default=100_000, help="TDM training clicks (one pass)")
    d.add_argument("--out", default="artifacts/bench-serve")
    d.add_argument("--skip-prepare", action="store_true", help="fail instead of building missing artifacts")
    d.add_argument("--prepare-only", action="store_true")
    m = p.add_argument_group("measurement")
    m.add_argument("--seconds", type=float, default=10.0, help="measured window of each load run")
    m.add_argument("--warmup", type=float, default=3.0, help="load before each saturation window")
    m.add_argument("--open-warmup", type=float, default=1.0, help="load before each fixed-rate window")
    m.add_argument("--connections", type=int, default=32, help="closed-loop connections (saturation)")
    m.add_argument("--open-connections", type=int, default=32, help="open-loop connections (fixed rate)")
    m.add_argument("--load", type=float, default=0.5, help="fixed rate as a fraction of the saturation rps")
    m.add_argument("--k", type=int, default=100)
    m.add_argument("--rerank-candidates", type=int, default=200, help="QUIVER_RERANK_CANDIDATES")
    m.add_argument("--request-users", type=int, default=2000, help="user ids rotated through the requests")
    m.add_argument("--microbatch", default="on,off", help="service runs: on, off or on,off")
    m.add_argument("--no-rerank", action="store_true", help="skip the rerank runs")
    m.add_argument("--floor-only", action="store_true", help="only the floor app (checks the load generator)")
    m.add_argument("--torch-threads", type=int, default=None, help="QUIVER_TORCH_THREADS (default: the service's)")
    m.add_argument("--batch-max-size", type=int, default=None, help="QUIVER_BATCH_MAX_SIZE (default: the service's)")
    m.add_argument("--batch-max-wait-ms", type=float, default=None, help="QUIVER_BATCH_MAX_WAIT_MS")
    m.add_argument("--port", type=int, default=18700, help="service port; the floor uses port + 1")
    m.add_argument("--startup-timeout", type=float, default=600.0, help="seconds to wait for /readyz")
    args = p.parse_args(argv)
    modes = [s.strip() for s in args.microbatch.split(",") if s.strip()]
    if not modes or any(s not in ("on", "off") for s in modes):
        p.error("--microbatch: on, off or on,off")
    args.microbatch = modes
    if args.items < 1000 or args.users < 10 or not 0 < args.load <= 1 or args.seconds <= 0 or args.connections < 1:
        p.error("--items >= 1000, --users >= 10, 0 < --load <= 1, --seconds > 0, --connections >= 1")
    return args


# ---------------------------------------------------------------- preparation


def venv_tool(name: str) -> str:
    """A console script of this venv (beside the running python), else on PATH."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if not found:
        raise BenchError(f"{name}: console script not found beside {sys.executable} nor on PATH (pip install -e .)")
    return found


def read_config(name: str) -> dict[str, Any]:
    path = REPO / "configs" / name
    if not path.is_file():
        raise BenchError(f"{path}: missing (the benchmark derives its training config from it)")
    return yaml.safe_load(path.read_text())


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:10]


class Layout:
    """Where the prepared artifacts live, each level keyed by what builds it, so a rerun reuses them:

    <out>/data/items{N}-users{U}-c{C}-s{seed}/              the demo catalog
    <out>/<data name>-<key>/models/dssm                      retriever (key: its config): QUIVER_ARTIFACTS
    <out>/<data name>-<key>/indexes/dssm-<key>               its index (key: factory, efSearch, floor)
    <out>/<data name>-<key>/models/tdm-<key>                 ranker (key: its config), beside the retriever
    """

    def __init__(self, args: argparse.Namespace, out: Path) -> None:
        self.args = args
        name = f"items{args.items}-users{args.users}-c{args.categories}-s{args.seed}"
        self.data = out / "data" / name
        self.dssm_cfg, self.tdm_cfg = self.configs()
        self.root = out / f"{name}-{_digest(self._keyed(self.dssm_cfg))}"  # QUIVER_ARTIFACTS
        self.hnsw = args.index.upper().startswith("HNSW")
        self.ef_search = args.ef_search if self.hnsw else 0
        index_key = {"index": args.index, "ef_search": self.ef_search, "recall_floor": args.recall_floor}
        if self.hnsw:  # the graph's build breadth (keys written before it was a setting meant FAISS's 40)
            index_key["ef_construction"] = args.ef_construction
        self.index = f"{DSSM}-{_digest(index_key)}"  # QUIVER_INDEX
        self.ranker = f"{TDM}-{_digest(self._keyed(self.tdm_cfg))}"  # QUIVER_RANKER
        self.dssm_cfg["output"] = {"root": str(self.root / "models"), "name": DSSM}
        self.tdm_cfg["output"] = {"root": str(self.root / "models"), "name": self.ranker}

    @staticmethod
    def _keyed(cfg: dict[str, Any]) -> dict[str, Any]:
        """The config without what only changes speed or chatter, or where the data lies (the data key has it)."""
        out = json.loads(json.dumps(cfg))
        out["data"].pop("path", None)
        out.pop("output", None)
        for knob in ("num_threads", "progress"):
            out["train"].pop(knob, None)
        return out

    def configs(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """The DSSM and TDM training configs: the demo ones, pointed at the bench data, trained briefly."""
        args, threads = self.args, os.cpu_count() or 1
        dssm = read_config("dssm_demo.yaml")
        dssm["data"]["path"] = str(self.data)
        dssm["train"] |= {
            "epochs": 1,
            "max_minutes": args.train_minutes,
            "valid_users": 1000,
            "num_threads": threads,
            "seed": args.seed,
            "progress": False,
        }
        if args.item_buckets:
            # The demo's item_id vocabulary holds only the items seen in training (a few hundred thousand of the
            # 1M here): every other item would share the out-of-vocabulary row and differ only by category, brand
            # and price, a catalog of near-duplicate vectors no HNSW graph searches well (recall@100 0.44 at
            # efSearch 2048 in a trial). Hashed ids give every catalog item its own (mostly untrained) row.
            for f in dssm["features"]["item"]:
                if f["name"] == "item_id":
                    f["kind"], f["num_buckets"] = "hash", args.item_buckets
        demo_tdm = read_config("tdm_demo.yaml")
        # The demo ranker's shape (features, model: what serving costs), trained here in one capped pass with
        # popularity negatives only: a retriever-mined pool would search the 1M catalog for every user, minutes of
        # work that only matter for the ranker's quality.
        tdm = {
            "data": demo_tdm["data"] | {"path": str(self.data)},
            "features": demo_tdm["features"],
            "model": demo_tdm["model"],
            "negatives": {"per_positive": 4, "retrieved_ratio": 0.0, "alpha": 0.75, "valid_per_positive": 20},
            "train": {
                "epochs": 1,
                "clicks_per_epoch": args.tdm_clicks,
                "batch_size": 1024,
                "lr": 0.005,
                "valid_metric": "gauc",
                "valid_users": 1000,
                "num_threads": threads,
                "seed": args.seed,
                "progress": False,
            },
        }
        return dssm, tdm


def run_step(cmd: list[str], what: str) -> tuple[float, str]:
    """Run a project tool, its progress on our stderr; (seconds, its last stdout line)."""
    log(f"{what}: {' '.join(cmd)}")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True)
    lines = []
    assert proc.stdout is not None
    for line in proc.stdout:
        sys.stderr.write(line)
        lines.append(line.rstrip("\n"))
    rc = proc.wait()
    seconds = time.perf_counter() - t0
    if rc != 0:
        raise BenchError(f"{what} failed (exit {rc}): {' '.join(cmd)}")
    log(f"{what}: done in {seconds:.1f} s")
    return seconds, (lines[-1] if lines else "")


def latest(folder: Path, pointer: str) -> Path | None:
    """The version the pointer names, None when there is none yet (or it is broken: rebuilt then)."""
    try:
        return resolve_version(folder, pointer, "built")
    except QuiverError:
        return None


def have_demo_data(data: Path) -> bool:
    return all((data / f).is_file() for f in ("interactions.parquet", "users.parquet", "items.parquet"))


def prepare(args: argparse.Namespace, lay: Layout) -> dict[str, Any]:
    """Build whatever is missing; returns prep.json (step seconds, index facts). Cached steps keep their times."""
    root, data = lay.root, lay.data
    if args.skip_prepare:  # check everything first: a refused run leaves nothing behind
        for what, ok in (
            (f"demo data {data}", have_demo_data(data)),
            (f"DSSM bundle {root / 'models' / DSSM}", latest(root / "models" / DSSM, "LATEST")),
            (f"index {root / 'indexes' / lay.index}", latest(root / "indexes" / lay.index, "CURRENT")),
            (f"TDM bundle {root / 'models' / lay.ranker}", latest(root / "models" / lay.ranker, "LATEST")),
        ):
            if not ok:
                raise BenchError(f"--skip-prepare: {what} missing (run once without --skip-prepare)")
    root.mkdir(parents=True, exist_ok=True)
    prep_path = root / "prep.json"
    prep: dict[str, Any] = json.loads(prep_path.read_text()) if prep_path.is_file() else {}
    steps_done = []

    def save() -> None:
        prep_path.write_text(json.dumps(prep, indent=1, sort_keys=True) + "\n")

    if not have_demo_data(data):
        cmd = [venv_tool("quiver-train"), "demo-data", "--out", str(data), "--items", str(args.items)]
        cmd += ["--users", str(args.users), "--categories", str(args.categories), "--seed", str(args.seed)]
        seconds, _ = run_step(cmd, f"demo data ({args.items:,} items, {args.users:,} users)")
        (data / "seconds.json").write_text(json.dumps({"demo_data_s": round(seconds, 1)}) + "\n")
        steps_done.append("demo_data")
    if (data / "seconds.json").is_file():
        prep |= json.loads((data / "seconds.json").read_text())
    cfg_dir = root / "configs"
    cfg_dir.mkdir(exist_ok=True)
    for name, cfg in (("dssm.yaml", lay.dssm_cfg), (f"{lay.ranker}.yaml", lay.tdm_cfg)):
        (cfg_dir / name).write_text(yaml.safe_dump(cfg, sort_keys=False))
    if latest(root / "models" / DSSM, "LATEST") is None:
        cmd = [venv_tool("quiver-train"), "fit", "--config", str(cfg_dir / "dssm.yaml")]
        seconds, _ = run_step(cmd, "DSSM training (speed benchmark: one epoch at most)")
        prep["dssm_fit_s"] = round(seconds, 1)
        steps_done.append("dssm_fit")
        save()
    if latest(root / "indexes" / lay.index, "CURRENT") is None:
        cmd = [venv_tool("quiver-index"), "build", "--model", str(root / "models" / DSSM), "--name", lay.index]
        cmd += ["--out", str(root / "indexes"), "--index", args.index, "--recall-floor", str(args.recall_floor)]
        if lay.hnsw:
            cmd += ["--ef-construction", str(args.ef_construction)]
        if lay.ef_search:
            cmd += ["--ef-search", str(lay.ef_search), "--allow-low-recall"]
        seconds, _ = run_step(cmd, f"{args.index} index over the catalog")
        prep.setdefault("index_build_s", {})[lay.index] = round(seconds, 1)
        steps_done.append("index_build")
        save()
    if latest(root / "models" / lay.ranker, "LATEST") is None:
        cmd = [venv_tool("quiver-train"), "fit", "--config", str(cfg_dir / f"{lay.ranker}.yaml")]
        seconds, _ = run_step(cmd, f"TDM training ({args.tdm_clicks:,} clicks)")
        prep.setdefault("tdm_fit_s", {})[lay.ranker] = round(seconds, 1)
        steps_done.append("tdm_fit")
        save()
    prep["built_now"] = steps_done
    return prep


def artifact_facts(lay: Layout) -> dict[str, Any]:
    """What the service will load: versions, sizes, the index's search parameters and measured recall."""
    root = lay.root
    model = latest(root / "models" / DSSM, "LATEST")
    index = latest(root / "indexes" / lay.index, "CURRENT")
    ranker = latest(root / "models" / lay.ranker, "LATEST")
    if model is None or index is None or ranker is None:
        raise BenchError(f"{root}: incomplete artifacts (model {model}, index {index}, ranker {ranker})")
    mm = json.loads((model / "manifest.json").read_text())
    im = json.loads((index / "manifest.json").read_text())
    rm = json.loads((ranker / "manifest.json").read_text())
    metrics = mm.get("metrics", {})
    return {
        "model_version": mm.get("version"),
        "index_version": im.get("version"),
        "index": lay.index,
        "ranker": lay.ranker,
        "ranker_version": rm.get("version"),
        "index_factory": im["index"].get("factory"),
        "index_search": im["index"].get("search"),
        "index_items": im.get("num_items"),
        "index_recall@100": im.get("quality", {}).get("recall"),
        "index_recall_sweep": im.get("quality", {}).get("sweep"),
        "index_manifest_build_s": im.get("build", {}).get("seconds"),
        "index_mb": round((index / "index.faiss").stat().st_size / 2**20, 1),
        "dssm_epochs_run": len(metrics.get("history", [])),
        "dssm_valid": {k: v for k, v in metrics.items() if k.startswith("valid_")},
        "tdm_valid": {k: v for k, v in rm.get("metrics", {}).items() if k.startswith("valid_")},
        "model_path": str(model),
    }


def request_users(model_path: Path, n: int, seed: int) -> list[str]:
    import numpy as np
    import pyarrow.parquet as pq

    ids = pq.read_table(model_path / "users.parquet", columns=["user_id"])["user_id"].to_pylist()
    if not ids:
        raise BenchError(f"{model_path / 'users.parquet'}: no users")
    pick = np.random.default_rng(seed).choice(len(ids), size=min(n, len(ids)), replace=False)
    return [str(ids[i]) for i in pick]


# ---------------------------------------------------------------- servers


def http(method: str, url: str, body: dict[str, Any] | None = None, timeout: float = 30.0) -> tuple[int, bytes]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


class Server:
    """A server process (own process group), started with its log in a file; waits for GET /readyz == 200."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], port: int, logs: Path) -> None:
        self.name, self.cmd, self.env, self.port = name, cmd, env, port
        self.log_path = logs / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.startup_s = 0.0

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float) -> None:
        with socket.socket() as probe:  # another server on the port would answer our /readyz
            if probe.connect_ex(("127.0.0.1", self.port)) == 0:
                raise BenchError(f"port {self.port} is already in use: pick another with --port")
        log(f"starting {self.name}: {' '.join(self.cmd)}")
        t0 = time.perf_counter()
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen(
                self.cmd, cwd=REPO, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        last = ""
        while time.perf_counter() - t0 < timeout:
            if self.proc.poll() is not None:
                tail = self.log_path.read_text(errors="replace").strip().splitlines()[-15:]
                raise BenchError(
                    f"{self.name} exited with {self.proc.returncode} before it was ready; log {self.log_path}:\n  "
                    + "\n  ".join(tail)
                )
            try:
                status, body = http("GET", self.base + "/readyz", timeout=5)
                if status == 200:
                    self.startup_s = time.perf_counter() - t0
                    log(f"{self.name} ready after {self.startup_s:.1f} s (pid {self.proc.pid})")
                    return
                last = f"{status} {body[:200]!r}"
            except OSError as err:
                last = str(err)
            time.sleep(0.5)
        self.stop()
        raise BenchError(f"{self.name}: /readyz not 200 after {timeout:.0f} s (last: {last}); log {self.log_path}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)  # its own session: the server and nothing else
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        except ProcessLookupError:
            pass

    def rss_mb(self) -> float | None:
        if self.proc is None:
            return None
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return round(int(line.split()[1]) / 1024, 1)
        except OSError:
            return None
        return None


def service_env(args: argparse.Namespace, lay: Layout, microbatch: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUIVER_")}
    env |= {
        "QUIVER_ARTIFACTS": str(lay.root),
        "QUIVER_MODEL": DSSM,
        "QUIVER_INDEX": lay.index,
        "QUIVER_RANKER": lay.ranker,
        "QUIVER_HOST": "127.0.0.1",
        "QUIVER_PORT": str(args.port),
        "QUIVER_MICROBATCH": "true" if microbatch else "false",
        "QUIVER_RELOAD_POLL_S": "0",
        "QUIVER_LOG_LEVEL": "warning",
        "QUIVER_RERANK_CANDIDATES": str(args.rerank_candidates),
    }
    for name, value in (
        ("QUIVER_TORCH_THREADS", args.torch_threads),
        ("QUIVER_BATCH_MAX_SIZE", args.batch_max_size),
        ("QUIVER_BATCH_MAX_WAIT_MS", args.batch_max_wait_ms),
    ):
        if value is not None:
            env[name] = str(value)
    return env


def check_service_code() -> None:
    if not (REPO / "service" / "app.py").is_file():
        raise BenchError(
            "service/app.py: missing, the service (issue #6) is not there yet; --floor-only measures the floor"
        )


def preflight(server: Server, users: list[str], k: int, rerank: bool) -> bytes:
    """One request of the kind about to be measured: 200 with k items, or a clear error. Returns the body."""
    status, body = http("POST", server.base + "/recall", {"user_id": users[0], "k": k, "rerank": rerank})
    what = f"{server.name} POST /recall (k={k}, rerank={rerank})"
    if status != 200:
        raise BenchError(f"{what}: HTTP {status}: {body[:300]!r}")
    try:
        items = json.loads(body)["items"]
    except (ValueError, KeyError, TypeError):
        raise BenchError(f"{what}: not a /recall answer: {body[:300]!r}") from None
    if len(items) != k:
        raise BenchError(f"{what}: {len(items)} items, expected {k}")
    return body


# ---------------------------------------------------------------- load


def loadgen(args: argparse.Namespace, url: str, bodies: Path, pid: int | None, mode: str, **kw: Any) -> dict:
    cmd = [sys.executable, str(BENCH / "loadgen.py"), "--url", url, "--bodies", str(bodies), "--mode", mode]
    cmd += ["--seconds", str(args.seconds)]
    if pid:
        cmd += ["--pid", str(pid)]
    for k, v in kw.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if out.returncode != 0 or not out.stdout.strip():
        raise BenchError(f"load generator failed (exit {out.returncode}): {out.stderr.strip()[-500:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def scrape(server: Server) -> dict[str, float]:
    """The service's Prometheus histogram sums and counts (stage timings, batch sizes); {} for the floor."""
    try:
        status, text = http("GET", server.base + "/metrics", timeout=10)
    except OSError:
        return {}
    if status != 200:
        return {}
    out: dict[str, float] = {}
    for line in text.decode(errors="replace").splitlines():
        if line.startswith(("quiver_stage_duration_seconds_", "quiver_batch_size_")) and (
            "_sum" in line or "_count" in line
        ):
            name, _, value = line.rpartition(" ")
            try:
                out[name] = float(value)
            except ValueError:
                continue
    return out


def stage_summary(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """Per stage, mean ms per observation and observations over a run; mean micro-batch size."""
    delta = {k: after[k] - before.get(k, 0.0) for k in after}
    out: dict[str, Any] = {}
    for key, n in delta.items():
        if not key.startswith("quiver_stage_duration_seconds_count") or n <= 0:
            continue
        labels = key[len("quiver_stage_duration_seconds_count") :]
        stage = labels.split('stage="', 1)[-1].split('"', 1)[0]
        total = delta.get("quiver_stage_duration_seconds_sum" + labels, 0.0)
        out[stage] = {"mean_ms": round(1000 * total / n, 3), "count": int(n)}
    batches = delta.get("quiver_batch_size_count", 0.0)
    if batches > 0:
        out["microbatch"] = {
            "batches": int(batches),
            "mean_size": round(delta.get("quiver_batch_size_sum", 0.0) / batches, 2),
        }
    return out


def measure(args: argparse.Namespace, server: Server, bodies: Path, label: str) -> dict[str, Any]:
    """Saturation (closed loop), then the fixed rate at --load of it (open loop)."""
    url = server.base + "/recall"
    pid = server.proc.pid if server.proc else None
    log(f"{label}: saturation, {args.connections} connections, {args.warmup:g}+{args.seconds:g} s")
    m0 = scrape(server)
    sat = loadgen(args, url, bodies, pid, "closed", connections=args.connections, warmup=args.warmup)
    m1 = scrape(server)
    rate = args.load * sat["rps"]
    log(f"{label}: {sat['rps']:.0f} req/s (p99 {sat['p99_ms']} ms), errors {sat['errors']}; open loop at {rate:.0f}/s")
    if rate <= 0:
        raise BenchError(f"{label}: no successful answers at saturation ({sat['statuses']}, {sat['transport_errors']})")
    half = loadgen(
        args, url, bodies, pid, "open", connections=args.open_connections, warmup=args.open_warmup, rate=rate
    )
    m2 = scrape(server)
    log(
        f"{label}: p50 {half['p50_ms']} ms, p99 {half['p99_ms']} ms at {half['achieved_rps']}/s, "
        f"errors {half['errors']}"
    )
    if m1:  # the service's own stage timings over each run (warm-up included)
        sat["stages"], half["stages"] = stage_summary(m0, m1), stage_summary(m1, m2)
    return {"saturation": sat, "half_load": half, "rss_mb": server.rss_mb()}


def write_bodies(path: Path, users: list[str], k: int, rerank: bool) -> Path:
    path.write_text("".join(json.dumps({"user_id": u, "k": k, "rerank": rerank}) + "\n" for u in users))
    return path


def summary(prefix: str, r: dict[str, Any] | None) -> dict[str, Any]:
    if r is None:
        return {}
    s, h = r["saturation"], r["half_load"]
    return {
        f"rps_{prefix}": s["rps"],
        f"p50_ms_{prefix}": h["p50_ms"],
        f"p99_ms_{prefix}": h["p99_ms"],
        f"errors_{prefix}": s["errors"] + h["errors"],
        **(
            {f"mean_batch_{prefix}": s["stages"]["microbatch"]["mean_size"]}
            if "microbatch" in s.get("stages", {})
            else {}
        ),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except BenchError as err:
        print(f"serve bench: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("serve bench: interrupted", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    out_root = Path(args.out) if Path(args.out).is_absolute() else REPO / args.out
    lay = Layout(args, out_root)
    root = lay.root
    line: dict[str, Any] = {"bench": "serve"}

    prep: dict[str, Any] = {}
    facts: dict[str, Any] = {}
    users: list[str] = [f"u{i}" for i in range(args.request_users)]
    if not args.floor_only:
        check_service_code()
        venv_tool("quiver-serve")
        t0 = time.perf_counter()
        prep = prepare(args, lay)
        prep_s = time.perf_counter() - t0
        facts = artifact_facts(lay)
        users = request_users(Path(facts["model_path"]), args.request_users, args.seed)
        log(f"artifacts ready in {prep_s:.1f} s under {root}")
        if args.prepare_only:
            print(json.dumps({"bench": "serve", "prepare_only": True, "artifacts": str(root), "prep": prep, **facts}))
            return 0

    run_dir = root / "runs" / time.strftime("%Y%m%d-%H%M%S")
    run_dir.mkdir(parents=True, exist_ok=True)
    measure_started = time.perf_counter()
    recall_bodies = write_bodies(run_dir / "recall.jsonl", users, args.k, False)
    rerank_bodies = write_bodies(run_dir / "rerank.jsonl", users, args.k, True)
    floor_body = run_dir / "floor_body.json"
    results: dict[str, Any] = {}
    servers: dict[str, dict[str, Any]] = {}

    def floor_run(label: str) -> None:
        cmd = [sys.executable, str(BENCH / "serve_floor.py"), "--port", str(args.port + 1), "--k", str(args.k)]
        if floor_body.is_file():
            cmd += ["--body", str(floor_body)]
        server = Server(label, cmd, dict(os.environ), args.port + 1, run_dir)
        try:
            server.start(60)
            body = preflight(server, users, args.k, False)
            servers[label] = {"startup_s": round(server.startup_s, 1), "body_bytes": len(body)}
            results[label] = measure(args, server, recall_bodies, label)
        finally:
            server.stop()

    def service_run(mb: str) -> None:
        label = f"service_mb_{mb}"
        cmd = [venv_tool("quiver-serve")]
        server = Server(label, cmd, service_env(args, lay, mb == "on"), args.port, run_dir)
        try:
            server.start(args.startup_timeout)
            body = preflight(server, users, args.k, False)
            if not floor_body.is_file():
                floor_body.write_bytes(body)  # the floor answers exactly these bytes' content
            servers[label] = {
                "startup_s": round(server.startup_s, 1),
                "body_bytes": len(body),
                "rss_mb": server.rss_mb(),
            }
            if not args.no_rerank:
                rb = preflight(server, users, args.k, True)
                servers[label]["rerank_body_bytes"] = len(rb)
            results[f"recall_mb_{mb}"] = measure(args, server, recall_bodies, f"/recall microbatch {mb}")
            if not args.no_rerank:
                results[f"rerank_mb_{mb}"] = measure(args, server, rerank_bodies, f"/recall rerank microbatch {mb}")
        finally:
            server.stop()

    if args.floor_only:
        floor_run("floor")
    else:
        service_run(args.microbatch[0])
        floor_run("floor")
        for mb in args.microbatch[1:]:
            service_run(mb)
        floor_run("floor_again")

    floors = [results[k]["saturation"]["rps"] for k in ("floor", "floor_again") if k in results]
    rps_floor = round(sum(floors) / len(floors), 1)
    floor_half = results["floor"]["half_load"]
    line |= {
        "rps_floor": rps_floor,
        "rps_floor_runs": floors,
        "p50_ms_floor": floor_half["p50_ms"],
        "p99_ms_floor": floor_half["p99_ms"],
    }
    primary = "on" if "on" in args.microbatch else args.microbatch[0]
    if not args.floor_only:
        rec = results.get(f"recall_mb_{primary}")
        line |= summary("recall", rec) | summary("rerank", results.get(f"rerank_mb_{primary}"))
        line["ratio"] = round(line["rps_recall"] / rps_floor, 3) if rps_floor else None
        if "rps_rerank" in line:
            line["ratio_rerank"] = round(line["rps_rerank"] / rps_floor, 3) if rps_floor else None
        line["primary_microbatch"] = primary
        line["microbatch"] = {
            mb: summary("recall", results.get(f"recall_mb_{mb}")) | summary("rerank", results.get(f"rerank_mb_{mb}"))
            for mb in args.microbatch
        }
        for s in line["microbatch"].values():
            if s.get("rps_recall") and rps_floor:
                s["ratio"] = round(s["rps_recall"] / rps_floor, 3)
        line["goal"] = (
            f"rps_recall >= {GOAL_RATIO}x rps_floor and p99_ms_recall <= {GOAL_P99_MS:g} at {args.load:g} load"
        )
        line["goal_ratio_met"] = line["ratio"] is not None and line["ratio"] >= GOAL_RATIO
        line["goal_p99_met"] = line["p99_ms_recall"] is not None and line["p99_ms_recall"] <= GOAL_P99_MS
    errors = sum(r["saturation"]["errors"] + r["half_load"]["errors"] for r in results.values())
    line["errors"] = errors
    line |= {
        "items": facts.get("index_items"),
        "users": args.users if facts else None,
        "k": args.k,
        "rerank_candidates": args.rerank_candidates,
        "settings": {
            "seconds": args.seconds,
            "warmup_s": args.warmup,
            "open_warmup_s": args.open_warmup,
            "connections": args.connections,
            "open_connections": args.open_connections,
            "load": args.load,
            "request_users": len(users),
            "torch_threads": args.torch_threads,
            "batch_max_size": args.batch_max_size,
            "batch_max_wait_ms": args.batch_max_wait_ms,
        },
        "artifacts": facts | {"root": str(root)},
        "prep": prep,
        "servers": servers,
        "machine": {
            "cpus": os.cpu_count(),
            "affinity": len(os.sched_getaffinity(0)),
            "python": platform.python_version(),
            "processor": platform.processor() or platform.machine(),
        },
        "measure_s": round(time.perf_counter() - measure_started, 1),
        "seconds": round(time.perf_counter() - started, 1),
        "runs": results,
        "note": (
            "speed benchmark: synthetic demo catalog, DSSM trained one epoch at most (item_id hashed into "
            f"{args.item_buckets} buckets so that unclicked items get distinct vectors) and TDM one capped pass with "
            "popularity negatives (model quality is not measured here); the index is served at the efSearch in "
            "artifacts.index_search, its recall@100 against exact search in artifacts.index_recall@100; latency "
            "is from each request's scheduled send time to its last byte (open loop, fixed rate = load x that "
            "endpoint's own saturation rps); server and load generator share the machine's cores; rps_floor is "
            "the mean of the floor runs"
        ),
    }
    (run_dir / "bench.json").write_text(json.dumps(line) + "\n")
    if errors:
        log(f"warning: {errors} failed requests (see runs.*.statuses / transport_errors)")
    print(json.dumps(line))
    return 0


if __name__ == "__main__":
    sys.exit(main())
