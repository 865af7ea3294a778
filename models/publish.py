"""Atomic publication of versioned bundle folders: the one implementation model bundles (LATEST) and index bundles
(CURRENT) share.

    <parent>/<version>/   a published version: complete (fsynced) before it was renamed into place
    <parent>/<pointer>    one line naming the version readers load (LATEST for models, CURRENT for indexes)
    <parent>/.lock        the fcntl lock that serialises writers
    <parent>/.tmp-*       staging folders of writers still at work (or dead: removed after an hour)

A reader only ever follows the pointer to a folder that was complete before the pointer named it, so it never sees a
half-written bundle. Writers serialise the short rename/pointer/retention step on the lock: two concurrent publishes
both land, the pointer names the one that committed last, and retention (which runs under the same lock) can never
remove a version another writer is about to point at.

Publish order is kept as the version folders' mtimes (set under the lock), because versions are content hashes and
say nothing about age. How a version is checked differs by bundle kind, so callers pass their own `intact`.
"""

import contextlib
import fcntl
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

MANIFEST = "manifest.json"  # every bundle kind's version folder holds one; a folder without it is not a version
LOCK = ".lock"
STAGING_PREFIX = ".tmp-"
STALE_STAGING_S = 3600  # a staging folder older than this was left by a writer that died

Intact = Callable[[Path], bool]


def fsync_dir(path: Path) -> None:
    """A rename or a new entry survives a crash only once its directory is synced too."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    for p in sorted(root.rglob("*")):
        if p.is_file():
            with p.open("rb") as f:
                os.fsync(f.fileno())
    fsync_dir(root)


def write_pointer(path: Path, value: str) -> None:
    """Atomically replace a one-line pointer file (LATEST / CURRENT)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(value + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # readable by a service running as another user
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def locked(parent: Path) -> Iterator[None]:
    """flock serialises threads and separate processes alike (the cron job and a person's build)."""
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
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=STAGING_PREFIX))
    os.chmod(tmp, 0o755)  # mkdtemp makes 0700: the service may run as another user
    try:
        yield tmp
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def pointed(parent: Path, pointer: str) -> str | None:
    """The version the pointer file names, None when there is none yet."""
    path = parent / pointer
    if not path.is_file():
        return None
    return path.read_text().strip() or None


def versions(parent: Path) -> list[str]:
    """Published versions, oldest first."""
    if not parent.is_dir():
        return []
    found = [p for p in parent.iterdir() if p.is_dir() and not p.name.startswith(".") and (p / MANIFEST).is_file()]
    return [p.name for p in sorted(found, key=lambda p: (p.stat().st_mtime_ns, p.name))]


def retain(parent: Path, pointer: str, keep: int | None) -> list[str]:
    """Delete all but the newest `keep` versions (None: keep all), never the one the pointer names; also stale
    staging folders. Call it under `locked(parent)`, or a concurrent writer's version may vanish before it is
    pointed at. Returns the versions removed."""
    removed: list[str] = []
    if keep is not None:
        current = pointed(parent, pointer)
        ordered = versions(parent)
        survivors = set(ordered[-max(keep, 1) :]) | ({current} if current else set())
        removed = [v for v in ordered if v not in survivors]
        for v in removed:
            shutil.rmtree(parent / v, ignore_errors=True)
    now = time.time()
    for p in parent.glob(f"{STAGING_PREFIX}*"):
        with contextlib.suppress(OSError):
            if now - p.stat().st_mtime > STALE_STAGING_S:
                shutil.rmtree(p, ignore_errors=True)
    return removed


def _touch(path: Path) -> None:
    """Mark a version as the most recently published (strictly after every other one)."""
    newest = max((p.stat().st_mtime_ns for p in path.parent.iterdir() if p.is_dir()), default=0)
    now = max(time.time_ns(), newest + 1)
    os.utime(path, ns=(now, now))


def commit(staged: Path, version: str, pointer: str, intact: Intact, keep: int | None) -> Path:
    """fsync a folder made by `staging`, rename it to <parent>/<version> (or keep a published copy that is
    `intact`, since versions are content hashes), point the pointer at it and apply retention. Returns the version
    folder."""
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
            fsync_dir(parent)
        _touch(final)
        write_pointer(parent / pointer, version)
        retain(parent, pointer, keep)
    return final


def point(parent: Path, version: str, pointer: str, keep: int | None) -> bool:
    """Make an already published version the pointed-to (and newest) one again; False if the pointer already named
    it."""
    with locked(parent):
        if pointed(parent, pointer) == version:
            return False
        _touch(parent / version)
        write_pointer(parent / pointer, version)
        retain(parent, pointer, keep)
    return True
