"""`quiver-serve` as a real process: settings from QUIVER_* variables, a bad one named on stderr."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port
from tests.serving import Tree

REPO = Path(__file__).resolve().parents[1]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUIVER_")}
    return env | {"OMP_NUM_THREADS": "1"} | extra


def test_quiver_serve_starts_uvicorn_from_the_environment(serving_tree: Tree) -> None:
    port = free_port()
    env = _env(
        QUIVER_ARTIFACTS=str(serving_tree.root),
        QUIVER_MODEL="tiny",
        QUIVER_RANKER="tiny_tdm",
        QUIVER_PORT=str(port),
        QUIVER_TORCH_THREADS="1",
        QUIVER_RELOAD_POLL_S="0",
    )
    proc = subprocess.Popen([sys.executable, "-m", "service.cli"], cwd=REPO, env=env, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2)
                if r.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "quiver-serve never became ready"
            time.sleep(0.2)
        assert r.json()["index_version"] == serving_tree.indexes[1]
        body = httpx.post(f"http://127.0.0.1:{port}/recall", json={"user_id": "u003", "k": 7, "rerank": True}).json()
        assert len(body["items"]) == 7 and body["ranker_version"] == serving_tree.ranker
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    # uvicorn shuts down gracefully, then re-raises SIGTERM so the exit status tells how it ended
    assert proc.returncode in (0, -signal.SIGTERM)
    assert b"Application shutdown complete" in err


def test_a_bad_setting_is_named_and_exits_2() -> None:
    env = _env(QUIVER_REDIS_TIMEOUT_MS="soon")
    done = subprocess.run([sys.executable, "-m", "service.cli"], cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 2
    assert "QUIVER_REDIS_TIMEOUT_MS" in done.stderr


@pytest.mark.parametrize(
    ("cpus", "says"),
    [("1,x", "QUIVER_MODEL_CPUS: Value error, 'x' is not a CPU number"), ("100000", "CPUs [100000] are not among")],
)
def test_a_bad_model_cpu_list_is_named_and_exits_2_without_a_traceback(cpus: str, says: str) -> None:
    env = _env(QUIVER_MODEL_PROCESS="true", QUIVER_MODEL_CPUS=cpus)
    done = subprocess.run([sys.executable, "-m", "service.cli"], cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 2
    assert says in done.stderr and "Traceback" not in done.stderr
