"""Shared fixtures: a small synthetic catalog and a tiny DSSM config over it."""

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml

from training.data.demo import generate_demo

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


@pytest.fixture
def tiny_config_file(demo_dir: Path, tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_config(demo_dir, tmp_path / "models")))
    return path


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private redis-server on a free port (never the one on 6379), terminated at the end of the session."""
    import shutil
    import socket
    import subprocess
    import time

    server = shutil.which("redis-server")
    if server is None:
        pytest.skip("redis-server is not installed (make system-deps)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    workdir = tmp_path_factory.mktemp("redis")
    args = [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", workdir]
    proc = subprocess.Popen([str(a) for a in args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5) as conn:
                    conn.sendall(b"PING\r\n")
                    if conn.recv(64).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on port {port} did not start")
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
