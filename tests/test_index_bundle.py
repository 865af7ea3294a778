"""Index bundles (DESIGN §6): build -> publish -> load round trip, refusal of anything that fails to verify, atomic
CURRENT under concurrent publishes, retention, and the Redis announcement."""

import json
import shutil
import threading
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pytest
import redis

from index.build import build
from index.bundle import CURRENT, IDS_FILE, INDEX_FILE, MANIFEST, ids_array, load_index, write_files
from index.factory import empty_index, parse_spec
from index.options import BuildOptions, PublishOptions, RunOptions
from index.publish import channel, commit, current_version
from index.quality import query_vectors
from index.search import search
from models.bundle import ModelBundle, load_bundle
from models.errors import QuiverError
from models.inputs import item_vectors, user_vectors
from models.publish import locked, retain, staging, versions, write_pointer
from tests.conftest import PROC_MAPS, mapped, tiny_config
from training.config import parse_config
from training.trainer import fit

NO_REDIS = PublishOptions()


def _opts(factory: str, allow_low_recall: bool = False, **settings: Any) -> BuildOptions:
    return BuildOptions(factory=factory, run=RunOptions(allow_low_recall=allow_low_recall, threads=1), **settings)


@pytest.fixture(scope="module")
def model(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> ModelBundle:
    root = tmp_path_factory.mktemp("models")
    result = fit(parse_config(tiny_config(demo_dir, root, epochs=1), "test"))
    assert result.bundle is not None
    return load_bundle(result.bundle)


@pytest.fixture(scope="module")
def catalog(model: ModelBundle) -> np.ndarray:
    """(I, D) item vectors in catalog order."""
    return np.concatenate([v for _, v in item_vectors(model)])


def _exact(catalog: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-(queries @ catalog.T), axis=1, kind="stable")[:, :k]  # (Q, k) rows


def test_flat_round_trip_returns_exact_neighbours(model: ModelBundle, catalog: np.ndarray, tmp_path: Path) -> None:
    result = build(model.path, tmp_path, _opts("Flat"), NO_REDIS, bundle=model)
    assert result.status == "built"
    assert (tmp_path / model.name / CURRENT).read_text().strip() == result.version
    loaded = load_index(tmp_path / model.name, model_manifest=model.manifest)
    assert loaded.version == result.version and loaded.model_version == model.version
    assert loaded.ids.dtype.kind == "U" and loaded.ids.tolist() == [str(i) for i in model.items["item_id"].to_pylist()]
    queries = query_vectors(model, 50, seed=7)
    scores, labels = loaded.index.search(queries, 10)
    truth = _exact(catalog, queries, 10)
    np.testing.assert_allclose(scores, np.take_along_axis(queries @ catalog.T, truth, 1), rtol=1e-5, atol=1e-6)
    assert (labels == truth).mean() > 0.99  # equal up to float ties
    manifest = loaded.manifest
    assert manifest["model"] == {"name": model.name, "version": model.version, "similarity": "cosine"}
    assert manifest["dim"] == catalog.shape[1] and manifest["num_items"] == len(catalog)
    assert manifest["metric"] == "inner_product" and manifest["quality"]["recall"] == pytest.approx(1.0)


@pytest.mark.parametrize("factory", ["HNSW16,Flat", "IVF16,Flat", "IVF16,PQ4x4"])
def test_approximate_indexes_record_and_apply_search_params(model: ModelBundle, tmp_path: Path, factory: str) -> None:
    result = build(model.path, tmp_path, _opts(factory, allow_low_recall=True), NO_REDIS, bundle=model)
    loaded = load_index(result.path, model_version=model.version)
    search = loaded.manifest["index"]["search"]
    if factory.startswith("HNSW"):
        assert faiss.downcast_index(loaded.index.index).hnsw.efSearch == search["efSearch"]
    else:
        assert faiss.extract_index_ivf(loaded.index).nprobe == search["nprobe"]
    quality = loaded.manifest["quality"]
    assert quality["k"] == 100 and quality["num_queries"] > 0 and 0.0 < quality["recall"] <= 1.0
    if quality["suggestion"]:  # the tuned knob value is the one that reached the floor
        assert quality["recall"] >= 0.95 and quality["search"] == quality["suggestion"]


def test_same_inputs_same_version_nothing_rebuilt(model: ModelBundle, tmp_path: Path) -> None:
    first = build(model.path, tmp_path, _opts("HNSW16"), NO_REDIS, bundle=model)
    stamp = (first.path / INDEX_FILE).stat().st_mtime_ns
    again = build(model.path, tmp_path, _opts("HNSW16,Flat"), NO_REDIS, bundle=model)
    assert again.status == "up_to_date" and again.version == first.version
    assert (first.path / INDEX_FILE).stat().st_mtime_ns == stamp
    other = build(model.path, tmp_path, _opts("HNSW16", search={"efSearch": 200}), NO_REDIS, bundle=model)
    assert other.version != first.version and current_version(tmp_path / model.name) == other.version
    back = build(model.path, tmp_path, _opts("HNSW16"), NO_REDIS, bundle=model)
    assert back.status == "repointed" and current_version(tmp_path / model.name) == first.version


@pytest.fixture
def published(model: ModelBundle, tmp_path: Path) -> Path:
    """A private copy of a published Flat index version folder."""
    return build(model.path, tmp_path / "indexes", _opts("Flat"), NO_REDIS, bundle=model).path


def test_corrupted_index_file_is_refused(published: Path) -> None:
    data = bytearray((published / INDEX_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (published / INDEX_FILE).write_bytes(bytes(data))
    with pytest.raises(QuiverError, match=r"index\.faiss: checksum mismatch"):
        load_index(published)


def test_unreadable_index_with_matching_checksum_is_refused(published: Path) -> None:
    """A bundle written by a broken writer: the checksum matches garbage. FAISS must not get to crash."""
    (published / INDEX_FILE).write_bytes(b"not a faiss index")
    manifest = json.loads((published / MANIFEST).read_text())
    from models.bundle import sha256_file

    manifest["files"][INDEX_FILE] = sha256_file(published / INDEX_FILE)
    (published / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(QuiverError, match="not a readable FAISS index"):
        load_index(published)


def test_wrong_checksum_is_refused(published: Path) -> None:
    manifest = json.loads((published / MANIFEST).read_text())
    manifest["files"][IDS_FILE] = "0" * 64
    (published / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(QuiverError, match=r"ids\.npy: checksum mismatch"):
        load_index(published)


def test_missing_file_and_bad_manifest_are_refused(published: Path) -> None:
    (published / IDS_FILE).unlink()
    with pytest.raises(QuiverError, match=r"ids\.npy: missing"):
        load_index(published)
    (published / MANIFEST).write_text("{not json")
    with pytest.raises(QuiverError, match="unreadable manifest"):
        load_index(published)


def test_model_version_mismatch_is_refused(published: Path, model: ModelBundle) -> None:
    with pytest.raises(QuiverError, match=f"built for model version {model.version}, the loaded model is version x"):
        load_index(published, model_version="x")
    other = {**model.manifest, "version": "0123456789abcdef"}
    with pytest.raises(QuiverError, match="the loaded model is version 0123456789abcdef"):
        load_index(published, model_manifest=other)
    wider = {**model.manifest, "embedding_dim": 32}
    with pytest.raises(QuiverError, match="index dimension 16 != model embedding_dim 32"):
        load_index(published, model_manifest=wider)


def test_ids_are_saved_without_pickle(published: Path) -> None:
    ids = np.load(published / IDS_FILE, allow_pickle=False)
    assert ids.dtype.kind == "U"
    assert ids_array([1, 22, "abc"]).dtype == np.dtype("<U3")


def _stage_version(parent: Path, seed: int) -> tuple[Path, str]:
    """A small real index bundle staged under parent; version = its seed."""
    x = np.random.default_rng(seed).normal(size=(20, 4)).astype(np.float32)
    index = empty_index(parse_spec("Flat"), 4, faiss.METRIC_INNER_PRODUCT)
    index.add_with_ids(x, np.arange(20, dtype=np.int64))
    manifest = {
        "name": parent.name,
        "version": f"v{seed:03d}",
        "model": {"name": "m", "version": "mv"},
        "index": {"factory": "Flat", "search": {}},
        "metric": "inner_product",
        "dim": 4,
        "num_items": 20,
    }
    with staging(parent) as tmp:
        write_files(tmp, index, ids_array([f"i{j}" for j in range(20)]), manifest)
        kept = parent / f".keep-{seed}"
        shutil.copytree(tmp, kept)
    return kept, manifest["version"]


def test_concurrent_publishes_leave_a_consistent_current(tmp_path: Path) -> None:
    parent = tmp_path / "idx"
    staged = [_stage_version(parent, s) for s in range(12)]
    errors: list[BaseException] = []
    start = threading.Barrier(len(staged))

    def publish(folder: Path, version: str) -> None:
        try:
            start.wait()
            commit(folder, version, PublishOptions(keep=3))
        except BaseException as err:  # surfaced below
            errors.append(err)

    threads = [threading.Thread(target=publish, args=s) for s in staged]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    current = current_version(parent)
    on_disk = versions(parent)
    assert current == on_disk[-1]  # CURRENT names the last one committed
    assert len(on_disk) == 3  # retention ran under the lock each time
    loaded = load_index(parent)
    assert loaded.version == current and loaded.index.ntotal == 20
    assert not list(parent.glob(".tmp-*")) and not list(parent.glob(".keep-*"))


def test_concurrent_publishes_from_processes(tmp_path: Path) -> None:
    """flock also serialises separate processes (the cron job and a person's build)."""
    import multiprocessing

    parent = tmp_path / "idx"
    staged = [_stage_version(parent, s) for s in range(6)]
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=commit, args=(folder, version, PublishOptions(keep=10))) for folder, version in staged]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    assert all(p.exitcode == 0 for p in procs)
    assert sorted(versions(parent)) == sorted(v for _, v in staged)
    assert current_version(parent) == versions(parent)[-1]
    load_index(parent)


def test_retention_keeps_the_newest(tmp_path: Path) -> None:
    parent = tmp_path / "idx"
    for seed in range(4):
        folder, version = _stage_version(parent, seed)
        commit(folder, version, PublishOptions(keep=2))
    assert versions(parent) == ["v002", "v003"] and current_version(parent) == "v003"


def test_retention_keeps_a_rolled_back_current(tmp_path: Path) -> None:
    parent = tmp_path / "idx"
    for seed in range(4):
        folder, version = _stage_version(parent, seed)
        commit(folder, version, PublishOptions(keep=10))
    write_pointer(parent / CURRENT, "v000")  # the oldest
    with locked(parent):
        removed = retain(parent, CURRENT, keep=1)
    assert sorted(removed) == ["v001", "v002"]
    assert sorted(versions(parent)) == ["v000", "v003"]
    assert load_index(parent).version == "v000"


def test_publish_is_announced_on_redis(model: ModelBundle, tmp_path: Path, redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    pubsub = client.pubsub()
    pubsub.subscribe(channel(model.name))
    assert pubsub.get_message(timeout=5)["type"] == "subscribe"
    result = build(model.path, tmp_path, _opts("Flat"), PublishOptions(redis_url=redis_url), bundle=model)
    message = pubsub.get_message(timeout=5)
    assert message is not None and message["type"] == "message"
    assert json.loads(message["data"]) == {
        "name": model.name,
        "version": result.version,
        "model_version": model.version,
    }
    pubsub.close()
    client.close()


def test_unreachable_redis_warns_but_publishes(
    model: ModelBundle, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    unreachable = PublishOptions(redis_url=f"redis://127.0.0.1:{port}/0")
    result = build(model.path, tmp_path, _opts("Flat"), unreachable, bundle=model)
    assert current_version(tmp_path / model.name) == result.version
    assert "Redis notify failed" in capsys.readouterr().err


def test_multi_interest_model_end_to_end(demo_dir: Path, tmp_path: Path) -> None:
    """MIND: recall is measured on every active interest, and search merges them to the max-over-interests ranking."""
    cfg = tiny_config(demo_dir, tmp_path / "models", epochs=1)
    cfg["model"] = {"type": "mind", "output_dim": 16, "temperature": 0.1, "max_k": 3, "max_seq_len": 20}
    mind = load_bundle(fit(parse_config(cfg, "test")).bundle)
    result = build(mind.path, tmp_path / "indexes", _opts("Flat", num_queries=200), NO_REDIS, bundle=mind)
    assert result.manifest["quality"]["num_queries"] > 200  # several interests per sampled user
    loaded = load_index(result.path, model_manifest=mind.manifest)
    items = np.concatenate([v for _, v in item_vectors(mind)])  # (I, D)
    users = mind.users.slice(0, 16)
    histories = [h or [] for h in users.column("history").to_pylist()]
    vectors, mask = user_vectors(mind, users, histories)  # (16, K, D), (16, K)
    vectors, mask = vectors.numpy(), mask.numpy()
    assert mask.sum(1).max() > 1
    hits = search(loaded, vectors, 10, mask=mask, exclude=[[str(i) for i in h] for h in histories])
    for b, user_hits in enumerate(hits):
        scores = (vectors[b][mask[b]] @ items.T).max(0)  # (I,) best over active interests
        scores[[loaded.row_of()[str(i)] for i in histories[b] if str(i) in loaded.row_of()]] = -np.inf
        want = np.sort(scores)[::-1][:10]
        assert len(user_hits) == 10
        np.testing.assert_allclose([h.score for h in user_hits], want, rtol=1e-5, atol=1e-6)
        assert all(mask[b][h.interest] for h in user_hits)  # credited to an active interest


@pytest.mark.skipif(not PROC_MAPS.exists(), reason="needs Linux /proc to see the mapping")
@pytest.mark.parametrize("factory", ["Flat", "IVF16,SQ8", "HNSW16,Flat"])
def test_mmap_load_searches_like_a_copy_and_maps_the_file(model: ModelBundle, tmp_path: Path, factory: str) -> None:
    """What the service loads (mmap=True): the codes stay in the file's pages, shared by every worker process that
    serves the bundle, and every search answers exactly as from a copy in memory."""
    result = build(model.path, tmp_path, _opts(factory, allow_low_recall=True), NO_REDIS, bundle=model)
    copy = load_index(result.path, model_version=model.version)
    assert not mapped(result.path / INDEX_FILE)
    shared = load_index(result.path, model_version=model.version, mmap=True)
    assert mapped(result.path / INDEX_FILE)
    queries = query_vectors(model, 40, seed=3)
    got, want = shared.index.search(queries, 20), copy.index.search(queries, 20)
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    assert shared.manifest["index"]["search"] == copy.manifest["index"]["search"]
