"""Atomic publication of index bundles: staged folder -> fsync -> rename -> CURRENT -> retention -> Redis.

A reader (the service) only ever follows CURRENT to a folder that was complete before CURRENT named it, so it never
sees a half-written bundle. Writers serialise the short rename/CURRENT/retention step on an fcntl lock in the name
folder: two concurrent publishes both land, CURRENT names the one that committed last, and retention (which runs
under the same lock) can never remove a version another writer is about to point CURRENT at.

Publish order is kept as the version folders' mtimes (set under the lock), because versions are content hashes and
say nothing about age.
"""

import contextlib
import fcntl
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from index.bundle import CURRENT, MANIFEST, read_index_manifest, verify_index_files
from models.bundle import fsync_tree, write_pointer
from models.errors import QuiverError

LOCK = ".lock"
DEFAULT_KEEP = 3
STALE_STAGING_S = 3600  # a .tmp- folder older than this was left by a writer that died


def channel(name: str) -> str:
    """Redis channel the service subscribes to for new versions of index `name`."""
    return f"quiver:index:{name}"


@contextlib.contextmanager
def locked(parent: Path) -> Iterator[None]:
    parent.mkdir(parents=True, exist_ok=True)
    with (parent / LOCK).open("a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def staging(parent: Path) -> Iterator[Path]:
    """A private temporary folder beside the versions (same filesystem, so the final rename is atomic);
    removed if the block raises."""
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=".tmp-"))
    os.chmod(tmp, 0o755)  # mkdtemp makes 0700: the service may run as another user
    try:
        yield tmp
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def intact(folder: Path) -> bool:
    """A published version whose manifest reads and whose files match their checksums."""
    if not (folder / MANIFEST).is_file():
        return False
    try:
        verify_index_files(folder, read_index_manifest(folder))
    except QuiverError:
        return False
    return True


def current_version(parent: Path) -> str | None:
    pointer = parent / CURRENT
    if not pointer.is_file():
        return None
    return pointer.read_text().strip() or None


def versions(parent: Path) -> list[str]:
    """Published versions, oldest first."""
    if not parent.is_dir():
        return []
    found = [p for p in parent.iterdir() if p.is_dir() and not p.name.startswith(".") and (p / MANIFEST).is_file()]
    return [p.name for p in sorted(found, key=lambda p: (p.stat().st_mtime_ns, p.name))]


def _retain(parent: Path, keep: int) -> list[str]:
    """Delete all but the newest `keep` versions, never the one CURRENT names; also stale staging folders."""
    current = current_version(parent)
    ordered = versions(parent)
    survivors = set(ordered[-max(keep, 1) :]) | ({current} if current else set())
    removed = [v for v in ordered if v not in survivors]
    for v in removed:
        shutil.rmtree(parent / v, ignore_errors=True)
    now = time.time()
    for p in parent.glob(".tmp-*"):
        with contextlib.suppress(OSError):
            if now - p.stat().st_mtime > STALE_STAGING_S:
                shutil.rmtree(p, ignore_errors=True)
    return removed


def _touch(path: Path) -> None:
    """Mark a version as the most recently published (strictly after every other one)."""
    newest = max((p.stat().st_mtime_ns for p in path.parent.iterdir() if p.is_dir()), default=0)
    now = max(time.time_ns(), newest + 1)
    os.utime(path, ns=(now, now))


def commit(staged: Path, version: str, keep: int = DEFAULT_KEEP, redis_url: str | None = None) -> Path:
    """fsync the staged folder, rename it to <parent>/<version> (or keep an identical published one), point
    CURRENT at it, apply retention, then announce it on Redis. Returns the version folder."""
    parent = staged.parent
    fsync_tree(staged)
    with locked(parent):
        final = parent / version
        if intact(final):
            shutil.rmtree(staged)  # same content hash: this version is already there
        else:
            if final.exists():  # damaged (failed checksum) or debris from an interrupted writer: replaced
                trash = parent / f".trash-{version}-{os.getpid()}"
                os.rename(final, trash)
                shutil.rmtree(trash, ignore_errors=True)
            os.rename(staged, final)
            _fsync_dir(parent)
        _touch(final)
        write_pointer(parent / CURRENT, version)
        _retain(parent, keep)
    notify(redis_url, parent.name, version, final)
    return final


def point_current(parent: Path, version: str, keep: int = DEFAULT_KEEP, redis_url: str | None = None) -> bool:
    """Make an already published version CURRENT again (an idempotent rebuild); False if it already was."""
    with locked(parent):
        if current_version(parent) == version:
            return False
        _touch(parent / version)
        write_pointer(parent / CURRENT, version)
        _retain(parent, keep)
    notify(redis_url, parent.name, version, parent / version)
    return True


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def notify(redis_url: str | None, name: str, version: str, path: Path) -> bool:
    """Publish {"name", "version", "model_version"} on quiver:index:<name>. The bundle is already on disk and
    CURRENT names it, so a Redis outage only delays subscribers (they also read CURRENT on start): a warning, not
    a failure."""
    if not redis_url:
        return False
    import redis

    message: dict[str, Any] = {"name": name, "version": version}
    with contextlib.suppress(OSError, ValueError, KeyError):
        message["model_version"] = json.loads((path / MANIFEST).read_text())["model"]["version"]
    try:
        client = redis.Redis.from_url(redis_url, socket_timeout=5, socket_connect_timeout=5)
        try:
            client.publish(channel(name), json.dumps(message, sort_keys=True))
        finally:
            client.close()
    except (redis.RedisError, ValueError) as err:
        print(f"quiver-index: warning: published {name}/{version} but Redis notify failed ({err})", file=sys.stderr)
        return False
    return True
