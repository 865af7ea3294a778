"""Helpers for the service tests: a published artifacts tree and a real uvicorn server in a thread."""

import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import uvicorn
from fastapi import FastAPI

from index.build import build
from index.options import BuildOptions, PublishOptions
from index.publish import point_current
from service.app import create_app
from service.settings import Settings
from tests.conftest import free_port, tdm_config, tiny_config
from training.config import parse_config
from training.tdm_config import parse_tdm_config
from training.tdm_trainer import TDMTrainer
from training.trainer import fit

BIN = Path(sys.executable).parent


@dataclass(frozen=True)
class Tree:
    """Two retriever versions of model `tiny`, an index for each (CURRENT = the second), a ranker `tiny_tdm`."""

    root: Path
    models: tuple[str, str]  # model versions
    indexes: tuple[str, str]  # index versions, built from models[0] and models[1]
    ranker: str

    def copy(self, dest: Path) -> "Tree":
        shutil.copytree(self.root, dest)
        return Tree(dest, self.models, self.indexes, self.ranker)

    def point(self, which: int) -> None:
        """Publish pair `which` (0 or 1) as the index's CURRENT."""
        point_current(self.root / "indexes" / "tiny", self.indexes[which], PublishOptions())


def make_tree(demo_dir: Path, root: Path) -> Tree:
    models, indexes = [], []
    for seed in (1, 2):
        cfg = tiny_config(demo_dir, root / "models", epochs=1, seed=seed)
        bundle = fit(parse_config(cfg, "test")).bundle
        assert bundle is not None
        models.append(bundle.name)
        indexes.append(build(bundle, root / "indexes", BuildOptions(factory="Flat"), PublishOptions()).version)
    TDMTrainer(parse_tdm_config(tdm_config(demo_dir, root / "models", None, epochs=1), "test")).fit()
    ranker = (root / "models" / "tiny_tdm" / "LATEST").read_text().strip()
    return Tree(root, (models[0], models[1]), (indexes[0], indexes[1]), ranker)


def settings(tree: Tree | Path, **overrides: object) -> Settings:
    root = tree.root if isinstance(tree, Tree) else tree
    base: dict[str, object] = {
        "artifacts": root,
        "model": "tiny",
        "ranker": "tiny_tdm",
        "admin_token": "s3cret",
        "reload_poll_s": 0,
        "torch_threads": 1,
        "batch_max_wait_ms": 1.0,
    }
    return Settings(**(base | overrides))


@contextmanager
def running(cfg: Settings) -> Iterator[str]:
    """The app under a real uvicorn server on a free port (its own thread and event loop); yields the base URL."""
    with running_app(create_app(cfg)) as url:
        yield url


@contextmanager
def running_app(app: FastAPI) -> Iterator[str]:
    """`running` for an app the test built itself (to look at its state while it serves)."""
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning", access_log=False)
    )
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@contextmanager
def quiver_serve(root: Path, redis_url: str, log: Path, ready: int = 1, **env: str) -> Iterator[str]:
    """A real `quiver-serve` process (the console script compose runs) serving model `tiny` of `root`; yields its
    base URL once /readyz answers 200 `ready` times in a row, each on a fresh connection (with several workers, many
    fresh connections sample them all). stderr goes to `log` (a pipe nobody reads could fill and stall the server).
    env: extra QUIVER_* variables."""
    port = free_port()
    variables = os.environ | {
        "QUIVER_ARTIFACTS": str(root),
        "QUIVER_MODEL": "tiny",
        "QUIVER_RANKER": "tiny_tdm",
        "QUIVER_REDIS_URL": redis_url,
        "QUIVER_RELOAD_POLL_S": "0",
        "QUIVER_TORCH_THREADS": "1",
        "QUIVER_PORT": str(port),
        "QUIVER_LOG_LEVEL": "warning",
        "OMP_NUM_THREADS": "1",
    }
    url = f"http://127.0.0.1:{port}"
    with log.open("wb") as err:
        proc = subprocess.Popen([str(BIN / "quiver-serve")], env=variables | env, stdout=subprocess.DEVNULL, stderr=err)
        try:
            deadline = time.monotonic() + 90
            while True:
                assert proc.poll() is None, f"quiver-serve exited: {log.read_text()[-2000:]}"
                try:
                    if all(httpx.get(f"{url}/readyz", timeout=5).status_code == 200 for _ in range(ready)):
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, f"quiver-serve never became ready: {log.read_text()[-2000:]}"
                time.sleep(0.1)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
