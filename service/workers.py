"""QUIVER_WORKERS > 1 on Linux: one listening socket per worker process, joined to one port with SO_REUSEPORT.

uvicorn's own workers share a single listening socket, and whichever process is in accept() when a burst of
keep-alive connections arrives takes most of them: bench/serve.py saw 32 connections split 29/3 and 31/1, one worker
doing nearly all the work while the other idled. With a socket per worker the kernel assigns every new connection to
one of the listening sockets by a hash of its addresses, so the workers get an even share however busy each one is.

Each worker binds its socket at start (a port in use fails at once) but listens only once its lifespan has loaded
and warmed the triple, so no connection is ever queued on a worker that cannot answer it yet; a worker that dies
takes its socket with it, the others take all new connections until this supervisor has restarted it. (The price:
connections the dying worker had not yet accepted are reset with it, like the ones it was answering; uvicorn's
shared socket would have kept those queued for the other worker.)
"""

import logging
import multiprocessing
import signal
import socket
import sys
import threading
import time
from typing import Any

import uvicorn
from uvicorn.config import STARTUP_FAILURE

log = logging.getLogger("quiver.workers")
APP = "service.app:create_app"


def balanced() -> bool:
    """Whether this platform spreads connections over SO_REUSEPORT sockets (Linux does; macOS and Windows do not)."""
    return sys.platform.startswith("linux") and hasattr(socket, "SO_REUSEPORT")


def reuseport_socket(host: str, port: int) -> socket.socket:
    """A bound, not yet listening TCP socket that other processes of this user may bind to the same port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def _worker(host: str, port: int, options: dict[str, Any]) -> None:
    """One worker process: its own socket, the app from the environment's QUIVER_* settings."""
    try:
        sock = reuseport_socket(host, port)
    except OSError as err:
        print(f"quiver-serve: cannot bind {host}:{port}: {err}", file=sys.stderr)
        sys.exit(STARTUP_FAILURE)
    server = uvicorn.Server(uvicorn.Config(APP, factory=True, host=host, port=port, **options))
    server.run(sockets=[sock])  # uvicorn listens on it once the lifespan has started
    if not server.started:
        sys.exit(STARTUP_FAILURE)


QUICK_EXIT_S = 10.0  # a worker gone this soon after its start counts towards a crash loop
MAX_QUICK_EXITS = 3  # in a row, in one slot: the supervisor gives up (exit 1) rather than restart forever


def supervise(workers: int, host: str, port: int, options: dict[str, Any], poll_s: float = 0.5) -> int:
    """Run `workers` processes until SIGINT/SIGTERM, restarting any that dies; 1 if one fails to start (a port in
    use or a broken app would fail the same way on every restart) or keeps dying within seconds of its start."""
    logging.basicConfig(level=str(options.get("log_level", "info")).upper(), format="%(levelname)s:     %(message)s")
    spawn = multiprocessing.get_context("spawn")  # a fresh interpreter each: no torch/OpenMP state forked

    def start() -> multiprocessing.process.BaseProcess:
        proc = spawn.Process(target=_worker, args=(host, port, options), name="quiver-worker")
        proc.start()
        return proc

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    procs = [start() for _ in range(workers)]
    started = [time.monotonic()] * workers
    quick_exits = [0] * workers
    log.info(
        "supervising %d workers on %s:%d (one SO_REUSEPORT socket each): %s",
        workers,
        host,
        port,
        [p.pid for p in procs],
    )
    rc = 0
    while not stop.wait(poll_s):
        for i, proc in enumerate(procs):
            if proc.is_alive():
                continue
            quick_exits[i] = quick_exits[i] + 1 if time.monotonic() - started[i] < QUICK_EXIT_S else 0
            if proc.exitcode == STARTUP_FAILURE or quick_exits[i] >= MAX_QUICK_EXITS:
                log.error("worker %s failed to start or keeps dying (exit %s): stopping", proc.pid, proc.exitcode)
                rc = 1
                stop.set()
                break
            log.warning("worker %s exited (%s): restarting it", proc.pid, proc.exitcode)
            procs[i], started[i] = start(), time.monotonic()
    for proc in procs:
        if proc.is_alive():
            proc.terminate()  # SIGTERM: uvicorn finishes the requests in flight, then exits
    deadline = time.monotonic() + 30
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
        if proc.is_alive():
            proc.kill()
            proc.join()
    return rc
