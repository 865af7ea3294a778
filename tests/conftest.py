"""Shared fixtures: a small synthetic catalog and a tiny DSSM config over it."""

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch
import yaml

from service.settings import Settings
from training.data.demo import generate_demo

if TYPE_CHECKING:
    from tests.serving import Tree

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    generate_demo(out, n_users=800, n_items=1000, n_categories=12, seed=3)
    return out


def tiny_config(data_dir: Path, out_root: Path, **train: object) -> dict:
    """A small DSSM on the demo catalog: trains in seconds on one core."""
    return {
        "data": {
            "format": "interactions",
            "path": str(data_dir),
            "train": "interactions.parquet",
            "users": "users.parquet",
            "items": "items.parquet",
            "max_seq_len": 20,
        },
        "features": {
            "user": [{"name": "user_id", "kind": "id", "embedding_dim": 8}, {"name": "region", "kind": "id"}],
            "item": [
                {"name": "item_id", "kind": "id", "embedding_dim": 16},
                {"name": "category", "kind": "id", "embedding_dim": 8},
                {"name": "price", "kind": "dense"},
            ],
            "hist": [{"name": "hist_item_id", "kind": "sequence", "shared_with": "item_id", "embedding_dim": 16}],
        },
        "model": {
            "type": "dssm",
            "user_tower": {"hidden_units": [64]},
            "item_tower": {"hidden_units": [64]},
            "output_dim": 16,
            "temperature": 0.1,
        },
        "negatives": {"mode": "sampled", "num": 128},
        "train": {"epochs": 2, "batch_size": 256, "lr": 0.005, "progress": False, **train},
        "output": {"root": str(out_root), "name": "tiny"},
    }


def sequence_config(data_dir: Path, out_root: Path, kind: str = "sasrec", **train: object) -> dict:
    """A small SASRec / HSTU on the demo catalog: the history read in order, every position predicting the next."""
    base = tiny_config(data_dir, out_root)
    return {
        "data": base["data"],
        "features": {"item": base["features"]["item"], "hist": base["features"]["hist"]},  # item_id 16, category, price
        "model": {"type": kind, "max_seq_len": 20, "num_blocks": 1, "num_heads": 2, "dropout": 0.1, "temperature": 0.1},
        "negatives": {"mode": "sampled", "num": 128, "alpha": 0.5},
        "train": {"epochs": 2, "batch_size": 64, "lr": 0.005, "progress": False, **train},
        "output": {"root": str(out_root), "name": f"tiny_{kind}"},
    }


def tdm_config(data_dir: Path, out_root: Path, retriever: Path | None, **train: object) -> dict:
    """A small TDM over the demo catalog; history items carry the same item features as the candidate."""
    base = tiny_config(data_dir, out_root)
    return {
        "data": base["data"],
        "features": {
            "user": [{"name": "region", "kind": "id", "embedding_dim": 4}],
            "item": base["features"]["item"],  # item_id 16, category 8, price
            "hist": base["features"]["hist"],
        },
        "model": {
            "type": "tdm",
            "windows_len": [1, 1, 2, 4, 12],
            "attention": {"hidden_units": [16]},
            "final": {"hidden_units": [64, 32]},
        },
        "negatives": {
            "per_positive": 4,
            "retrieved_ratio": 0.5 if retriever else 0.0,
            "retriever": str(retriever) if retriever else None,
            "retrieve_k": 50,
            "valid_per_positive": 10,
        },
        "train": {"epochs": 3, "batch_size": 128, "lr": 0.003, "progress": False, **train},
        "eval": {"retrieve_k": 50, "ks": [10]},
        "output": {"root": str(out_root), "name": "tiny_tdm"},
    }


@pytest.fixture
def tiny_config_file(demo_dir: Path, tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_config(demo_dir, tmp_path / "models")))
    return path


SETTING_VARIABLES = {f"QUIVER_{name.upper()}" for name in Settings.model_fields}  # every variable the service reads


def settings_from_env(env: dict[str, str]) -> Settings:
    """The service's settings from the QUIVER_* variables a container or a Makefile recipe passes it."""
    return Settings(**{key.removeprefix("QUIVER_").lower(): v for key, v in env.items() if key.startswith("QUIVER_")})


PROC_MAPS = Path("/proc/self/maps")  # Linux: what this process has mapped


def mapped(path: Path) -> bool:
    """Whether this process has the file memory-mapped."""
    return str(path.resolve()) in PROC_MAPS.read_text()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisProcess:
    """A private redis-server on a free port (never the machine's own on 6379) that a test may stop and restart
    on the same port, to make Redis really go away and come back."""

    def __init__(self, workdir: Path, *extra: str) -> None:
        server = shutil.which("redis-server")
        if server is None:
            pytest.skip("redis-server is not installed (make system-deps)")
        self.server = server
        self.workdir = workdir
        self.extra = extra
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _pong(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as conn:
                conn.sendall(b"PING\r\n")
                return conn.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def start(self) -> "RedisProcess":
        args = [self.server, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        args += ["--dir", str(self.workdir), *self.extra]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not self._pong():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on port {self.port} did not start")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One redis-server for the whole session, for tests that do not stop it."""
    server = RedisProcess(tmp_path_factory.mktemp("redis")).start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="session")
def serving_tree(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> "Tree":
    """Published bundles for the service tests (tests/serving.py); copy it before changing pointers."""
    from tests.serving import make_tree

    return make_tree(demo_dir, tmp_path_factory.mktemp("serving") / "artifacts")
