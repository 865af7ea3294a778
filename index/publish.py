"""Publication of index bundles: models/publish.py's staged folder -> fsync -> rename -> pointer -> retention, with
CURRENT as the pointer and the index's own `intact` check, then an announcement on Redis.

What is index-specific lives here: the checksum check of an index version, and the Redis channel the service
subscribes to. The announcement comes after the lock is released and the version is on disk, so a subscriber that
reads CURRENT on the message always finds it.
"""

import contextlib
import json
import sys
from pathlib import Path

from index.bundle import CURRENT, MANIFEST, read_index_manifest, verify_index_files
from index.options import PublishOptions
from models import publish
from models.errors import QuiverError


def channel(name: str) -> str:
    """Redis channel the service subscribes to for new versions of index `name`."""
    return f"quiver:index:{name}"


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
    return publish.pointed(parent, CURRENT)


def commit(staged: Path, version: str, options: PublishOptions) -> Path:
    """Publish a staged index folder as `version` (or keep an intact identical one), make it CURRENT, apply
    retention, then announce it. Returns the version folder."""
    final = publish.commit(staged, version, CURRENT, intact, options.keep)
    notify(options.redis_url, final.parent.name, version, final)
    return final


def point_current(parent: Path, version: str, options: PublishOptions) -> bool:
    """Make an already published version CURRENT again (an idempotent rebuild); False if it already was."""
    if not publish.point(parent, version, CURRENT, options.keep):
        return False
    notify(options.redis_url, parent.name, version, parent / version)
    return True


def announcement(name: str, version: str, model_version: str | None) -> str:
    """The message on quiver:index:<name> that a new version is CURRENT, from a publish or a service's reload."""
    message = {"name": name, "version": version} | ({"model_version": model_version} if model_version else {})
    return json.dumps(message, sort_keys=True)


def notify(redis_url: str | None, name: str, version: str, path: Path) -> bool:
    """Publish {"name", "version", "model_version"} on quiver:index:<name>. The bundle is already on disk and
    CURRENT names it, so a Redis outage only delays subscribers (they also read CURRENT on start): a warning, not
    a failure."""
    if not redis_url:
        return False
    import redis

    model_version = None
    with contextlib.suppress(OSError, ValueError, KeyError):
        model_version = str(json.loads((path / MANIFEST).read_text())["model"]["version"])
    try:
        client = redis.Redis.from_url(redis_url, socket_timeout=5, socket_connect_timeout=5)
        try:
            client.publish(channel(name), announcement(name, version, model_version))
        finally:
            client.close()
    except (redis.RedisError, ValueError) as err:
        print(f"quiver-index: warning: published {name}/{version} but Redis notify failed ({err})", file=sys.stderr)
        return False
    return True
