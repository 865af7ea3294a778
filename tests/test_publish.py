"""models/publish.py: model bundles (LATEST) publish under the same lock, replacement and retention rules as index
bundles (CURRENT), because both go through this one module."""

import json
import os
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest

from index.bundle import CURRENT, load_index
from index.options import PublishOptions
from index.publish import commit as commit_index
from models.bundle import LATEST, MANIFEST, WEIGHTS, load_bundle, verify_files
from models.publish import STALE_STAGING_S, locked, point, pointed, retain, versions, write_pointer
from tests.test_bundle import _leftovers, _model_and_data, _save
from tests.test_index_bundle import _stage_version


def _save_seed(root: Path, seed: int) -> Path:
    model, encoder, enc = _model_and_data(seed)
    return _save(root, model, encoder, enc)


def test_concurrent_model_saves_all_land_and_latest_names_the_last(tmp_path: Path) -> None:
    seeds = range(4)
    start = threading.Barrier(len(seeds))
    saved: list[Path] = []
    errors: list[BaseException] = []

    def save(seed: int) -> None:
        try:
            model, encoder, enc = _model_and_data(seed)
            start.wait()
            saved.append(_save(tmp_path, model, encoder, enc))
        except BaseException as err:  # surfaced below
            errors.append(err)

    threads = [threading.Thread(target=save, args=(s,)) for s in seeds]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    parent = tmp_path / "tiny"
    assert sorted(versions(parent)) == sorted(p.name for p in saved) and len(set(saved)) == len(seeds)
    assert pointed(parent, LATEST) == versions(parent)[-1]  # the one committed last
    for path in saved:
        verify_files(path, json.loads((path / MANIFEST).read_text()))
    assert _leftovers(parent) == []


def test_a_damaged_model_version_is_replaced_by_a_save_of_the_same_content(tmp_path: Path) -> None:
    model, encoder, enc = _model_and_data()
    first = _save(tmp_path, model, encoder, enc)
    weights = first / WEIGHTS
    weights.write_bytes(weights.read_bytes()[:-16])  # truncated on disk after it was published
    again = _save(tmp_path, model, encoder, enc)
    assert again == first
    verify_files(again, json.loads((again / MANIFEST).read_text()))
    assert load_bundle(tmp_path / "tiny").version == first.name
    assert _leftovers(tmp_path / "tiny") == []  # no .trash-* or .tmp-* left behind


def test_model_versions_are_all_kept_by_default_and_retention_spares_latest(tmp_path: Path) -> None:
    paths = [_save_seed(tmp_path, seed) for seed in range(3)]
    parent = tmp_path / "tiny"
    assert versions(parent) == [p.name for p in paths]  # keep=None: an index may still serve any of them
    write_pointer(parent / LATEST, paths[0].name)  # rolled back by hand to the oldest
    with locked(parent):
        removed = retain(parent, LATEST, keep=1)
    assert removed == [paths[1].name]
    assert versions(parent) == [paths[0].name, paths[2].name]
    assert load_bundle(parent).version == paths[0].name


def test_a_save_with_keep_removes_older_versions(tmp_path: Path) -> None:
    paths = [_save_seed(tmp_path, seed) for seed in range(2)]
    model, encoder, enc = _model_and_data(2)
    newest = _save(tmp_path, model, encoder, enc, keep=2)
    assert versions(tmp_path / "tiny") == [paths[1].name, newest.name]


def test_an_already_published_model_version_can_be_pointed_at_again(tmp_path: Path) -> None:
    first, second = (_save_seed(tmp_path, seed) for seed in range(2))
    parent = tmp_path / "tiny"
    assert point(parent, first.name, LATEST, keep=None)
    assert pointed(parent, LATEST) == first.name and versions(parent) == [second.name, first.name]
    assert not point(parent, first.name, LATEST, keep=None)  # already LATEST


def _publish_model(parent: Path) -> Callable[[], object]:
    """A save_bundle of model `parent.name`, ready to run."""
    model, encoder, enc = _model_and_data()
    return partial(_save, parent.parent, model, encoder, enc)


def _publish_index(parent: Path) -> Callable[[], object]:
    """The commit of an index version already staged under `parent`, ready to run."""
    folder, version = _stage_version(parent, 0)
    return partial(commit_index, folder, version, PublishOptions())


@pytest.mark.parametrize(
    ("publish", "pointer", "load"),
    [(_publish_model, LATEST, load_bundle), (_publish_index, CURRENT, load_index)],
    ids=["model", "index"],
)
def test_both_bundle_kinds_publish_under_the_shared_lock_and_clean_stale_staging(
    tmp_path: Path,
    publish: Callable[[Path], Callable[[], object]],
    pointer: str,
    load: Callable[[Path], object],
) -> None:
    parent = tmp_path / "tiny"
    parent.mkdir()
    run = publish(parent)
    stale, fresh = parent / ".tmp-dead-writer", parent / ".tmp-live-writer"
    stale.mkdir()
    fresh.mkdir()
    old = time.time() - STALE_STAGING_S - 60
    os.utime(stale, (old, old))
    errors: list[BaseException] = []

    def target() -> None:
        try:
            run()
        except BaseException as err:  # surfaced below
            errors.append(err)

    with locked(parent):  # models/publish.py's lock: a writer of either kind waits for it
        writer = threading.Thread(target=target)
        writer.start()
        time.sleep(0.5)
        assert writer.is_alive() and not (parent / pointer).exists()
    writer.join(timeout=60)
    assert not errors and not writer.is_alive()
    assert pointed(parent, pointer) == versions(parent)[-1]
    load(parent)
    assert not stale.exists() and fresh.exists()  # retention removed only the dead writer's folder
