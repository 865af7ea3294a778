"""ScaNN as an index backend (issue 16): through every `quiver-index` command, the bundle's files (checksummed,
loaded without running code), the manifest round trip, and the search semantics every backend shares (exactly k
with exclusions, multi-interest merge, never a -1)."""

import json
import pickle
from pathlib import Path

import faiss
import numpy as np
import pytest

from index.auto import candidates
from index.backend import as_searcher
from index.bundle import MANIFEST, load_index, write_files
from index.cli import main
from index.factory import empty_index, parse_spec, scann_spec
from index.publish import current_version
from index.quality import ExactTopK, measure, query_vectors, recall
from index.scann_backend import ScannSearcher, build
from index.search import search, search_vectors
from models.bundle import ModelBundle, load_bundle, save_bundle, sha256_file
from models.errors import QuiverError
from tests.conftest import tiny_config
from tests.test_index_cli import _run
from training.config import parse_config
from training.trainer import fit

pytest.importorskip("scann")  # Linux x86-64 only: elsewhere Quiver builds FAISS indexes alone

IP = faiss.METRIC_INNER_PRODUCT


@pytest.fixture(scope="module")
def model(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> ModelBundle:
    root = tmp_path_factory.mktemp("artifacts") / "models"
    fit(parse_config(tiny_config(demo_dir, root, epochs=1), "test"))
    return load_bundle(root / "tiny")


def _unit(n: int, dim: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_every_command_on_a_scann_index(capsys: pytest.CaptureFixture, model: ModelBundle, tmp_path: Path) -> None:
    models = tmp_path / "models"
    save_bundle(models, "tiny", model.model, model.manifest["model"], model.encoder, model.items, model.users)
    out = tmp_path / "indexes"
    common = ["--out", str(out), "--no-progress", "--threads", "1"]
    code, (built,), err = _run(capsys, "build", "--model", str(models / "tiny"), "--index", "scann", *common)
    assert code == 0 and err == ""  # ScaNN's C++ training log stays off stderr
    assert built["index"] == "ScaNN10,AH2" and built["recall@100"] >= 0.95  # 1,000 items: 10 leaves
    assert set(built["search"]) == {"leaves_to_search", "reorder"}
    code, listed, _ = _run(capsys, "list", "--out", str(out))
    assert code == 0 and listed[0]["index"] == "ScaNN10,AH2" and listed[0]["current"]
    code, (verified,), _ = _run(capsys, "verify", "--index", str(out / "tiny"), "--models", str(models))
    assert code == 0 and verified["status"] == "ok"

    user = model.users.slice(0, 1)
    seen = set(user.column("history").to_pylist()[0])
    code, (found,), _ = _run(
        capsys, "search", "--index", str(out / "tiny"), "--user-id", str(user.column("user_id")[0]), "--k", "25",
        "--models", str(models),
    )  # fmt: skip
    items = [h["item_id"] for h in found["items"]]
    assert code == 0 and len(items) == 25 == len(set(items)) and not seen & set(items)
    scores = [h["score"] for h in found["items"]]
    assert scores == sorted(scores, reverse=True)

    # rebuild: the same request (`scann`) for the same model is up to date; a newer model is indexed again with a
    # tree sized for its catalog
    rebuild = ["rebuild", "--models", str(models), *common]
    code, (same,), _ = _run(capsys, *rebuild)
    assert code == 0 and same["status"] == "up_to_date" and same["version"] == built["version"]
    newer = save_bundle(
        models, "tiny", model.model, model.manifest["model"], model.encoder, model.items.slice(0, 900), model.users
    )
    code, (again,), _ = _run(capsys, *rebuild)
    assert code == 0 and again["status"] == "built" and again["model_version"] == newer.name
    assert again["index"] == "ScaNN9,AH2" and load_index(out / "tiny").index.ntotal == 900
    # explicit search parameters are kept, refused when they are not ScaNN's or exceed the tree
    code, (pinned,), _ = _run(
        capsys, "build", "--model", str(models / "tiny"), "--index", "ScaNN9", "--leaves-to-search", "9",
        "--reorder", "300", *common,
    )  # fmt: skip
    assert code == 0 and pinned["search"] == {"leaves_to_search": 9, "reorder": 300}
    assert pinned["recall@100"] >= 0.99  # every leaf searched: exact up to the AH pre-selection
    for args, message in [
        (["--index", "ScaNN9", "--ef-search", "64"], "has no search parameter efSearch"),
        (["--index", "ScaNN9", "--leaves-to-search", "10"], "exceeds the 9 leaves"),
        (["--index", "scann", "--ef-construction", "64"], "efConstruction is an HNSW build parameter"),
        (["--index", "ScaNN2000"], "needs at least 2000 items"),
    ]:
        code, _, err = _run(capsys, "build", "--model", str(models / "tiny"), *args, *common)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_manifest_round_trip(model: ModelBundle, tmp_path: Path) -> None:
    code = main(
        ["build", "--model", str(model.path), "--index", "ScaNN10,AH2", "--leaves-to-search", "3", "--reorder",
         "250", "--out", str(tmp_path / "a"), "--no-progress", "--threads", "1", "--allow-low-recall"]
    )  # fmt: skip
    assert code == 0
    first = load_index(tmp_path / "a" / "tiny", model_manifest=model.manifest)
    index = first.manifest["index"]
    assert index["backend"] == "scann" and index["type"] == "scann" and index["factory"] == "ScaNN10,AH2"
    assert index["params"] == {
        "leaves": 10,
        "dims_per_block": 2,
        "anisotropic_threshold": 0.2,
        "training_sample": 1_000_000,
    }
    assert index["search"] == {"leaves_to_search": 3, "reorder": 250}
    assert first.manifest["build"]["train_sample"] == 1000 and first.manifest["build"]["request"] == "ScaNN10,AH2"
    assert all(f.startswith("scann/") for f in first.manifest["files"] if f not in ("ids.npy", "attributes.parquet"))
    searcher = first.index
    assert isinstance(searcher, ScannSearcher) and (searcher.leaves_to_search, searcher.reorder) == (3, 250)
    # what was loaded saves to the same files and reloads to the same answers
    copy = tmp_path / "b"
    copy.mkdir()
    keep = {k: v for k, v in first.manifest.items() if k not in ("files", "created_at", "format", "kind")}
    assert first.attributes is not None
    written = write_files(copy, first.index, first.ids, keep, (first.attributes, first.attribute_kinds))
    assert written["index"] == first.manifest["index"] and written["files"] == first.manifest["files"]
    second = load_index(copy)
    queries = query_vectors(model, 40, seed=3)
    for a, b in zip(search(first, queries, 30), search(second, queries, 30), strict=True):
        assert a == b


def _published(model: ModelBundle, root: Path) -> Path:
    assert main(["build", "--model", str(model.path), "--index", "scann", "--out", str(root),
                 "--no-progress", "--threads", "1"]) == 0  # fmt: skip
    folder = root / "tiny" / current_version(root / "tiny")
    return folder


def _rewrite(folder: Path, rel: str, data: bytes) -> None:
    """Replace a file and its checksum, so only the reader can tell."""
    (folder / rel).write_bytes(data)
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["files"][rel] = sha256_file(folder / rel)
    (folder / MANIFEST).write_text(json.dumps(manifest))


class _Trap:
    """Unpickling this creates a file: the proof that a loader ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


def test_loading_runs_no_code_and_refuses_bad_files(model: ModelBundle, tmp_path: Path) -> None:
    folder = _published(model, tmp_path / "indexes")
    marker = tmp_path / "ran"
    # scann's own load_searcher would unpickle this file; Quiver's loader never opens it
    (folder / "scann" / "scann_docids.pkl").write_bytes(pickle.dumps(_Trap(marker)))
    assert load_index(folder).index.ntotal == 1000 and not marker.exists()

    good = {rel: (folder / rel).read_bytes() for rel in ("scann/dataset.npy", "scann/ah_codebook.pb")}
    with (folder / "scann" / "dataset.npy").open("rb+") as f:  # a flipped byte: the checksum says so
        f.seek(200)
        f.write(b"\x01")
    with pytest.raises(QuiverError, match=r"dataset\.npy: checksum mismatch"):
        load_index(folder)
    objects = tmp_path / "objects.npy"
    np.save(objects, np.array([_Trap(marker)] * 4, dtype=object), allow_pickle=True)
    _rewrite(folder, "scann/dataset.npy", objects.read_bytes())  # a pickled array with a matching checksum
    with pytest.raises(QuiverError, match="not a plain numeric one"):
        load_index(folder)
    assert not marker.exists()
    _rewrite(folder, "scann/dataset.npy", good["scann/dataset.npy"])
    _rewrite(folder, "scann/ah_codebook.pb", good["scann/ah_codebook.pb"][:-40])
    with pytest.raises(QuiverError, match="not a readable ScaNN searcher"):
        load_index(folder)
    _rewrite(folder, "scann/ah_codebook.pb", good["scann/ah_codebook.pb"])
    manifest = json.loads((folder / MANIFEST).read_text())
    (folder / MANIFEST).write_text(json.dumps({**manifest, "metric": "l2"}))
    with pytest.raises(QuiverError, match="a inner_product index, the manifest says l2"):
        load_index(folder)
    (folder / MANIFEST).write_text(json.dumps(manifest))
    assert load_index(folder, model_manifest=model.manifest).index.ntotal == 1000


def _scann(vectors: np.ndarray, leaves: int, search: dict[str, int], metric: int = IP) -> ScannSearcher:
    index = build(parse_spec(f"ScaNN{leaves},AH2", vectors.shape[1]), vectors, metric)
    index.configure(search)
    return index


def test_search_semantics_match_faiss() -> None:
    """A narrow ScaNN search (1 leaf of 20, few candidates) still answers exactly k with exclusions, widening as
    FAISS's IVF does; searched wide it agrees with exact search."""
    x = _unit(2000, 16, seed=1)
    index = _scann(x, 20, {"leaves_to_search": 1, "reorder": 10})
    flat = empty_index(parse_spec("Flat"), 16, IP)
    flat.add_with_ids(x, np.arange(len(x), dtype=np.int64))
    users = _unit(6, 16, seed=2).reshape(3, 2, 16)  # (B, K, D): 3 users with 2 interests
    mask = np.array([[True, True], [True, False], [False, False]])
    exact = search_vectors(flat, users, mask, 60)
    banned = [exact[0][0][:40].tolist(), [], []]  # the first user's 40 best items are excluded
    for k in (60, 500):
        got = search_vectors(index, users, mask, k, banned)
        assert [len(g[0]) for g in got] == [k, k, 0]  # the user with no active interest gets nothing
        for (labels, scores, interests), ban in zip(got, banned, strict=True):
            assert (labels >= 0).all() and len(set(labels.tolist())) == len(labels)
            assert not set(ban) & set(labels.tolist())
            assert (np.diff(scores) <= 1e-6).all() and set(interests.tolist()) <= {0, 1}
    # beyond the catalog: everything not excluded, once
    (everything,) = search_vectors(index, users[:1], mask[:1], 5000, banned[:1])
    assert sorted(everything[0].tolist()) == sorted(set(range(2000)) - set(banned[0]))
    # the second user's single interest, every leaf searched, every candidate re-scored: exact search
    index.configure({"leaves_to_search": 20, "reorder": 2000})
    wide = search_vectors(index, users[1:2], mask[1:2], 60)
    assert wide[0][0].tolist() == exact[1][0].tolist()
    np.testing.assert_allclose(wide[0][1], exact[1][1], rtol=1e-5, atol=1e-6)


def test_l2_metric_and_refusals() -> None:
    x = np.random.default_rng(3).normal(size=(500, 8)).astype(np.float32)
    index = _scann(x, 5, {"leaves_to_search": 5, "reorder": 500}, metric=faiss.METRIC_L2)
    assert index.metric_type == faiss.METRIC_L2
    scores, labels = index.search(x[:3], 4)
    assert labels[:, 0].tolist() == [0, 1, 2] and np.allclose(scores[:, 0], 0.0, atol=1e-4)  # squared distances
    assert (np.diff(scores, axis=1) >= 0).all()  # smaller is better, as FAISS's L2
    with pytest.raises(QuiverError, match="needs at least 16 items"):
        build(parse_spec("ScaNN2", 8), x[:10], IP)
    with pytest.raises(QuiverError, match="not valid for a ScaNN index"):
        index.configure({"nprobe": 4})


def test_tuning_trades_leaves_against_candidates() -> None:
    """measure() finds, per re-scoring depth, the fewest leaves reaching the floor, times those pairs and keeps the
    fastest; a given parameter is kept and only the other swept."""
    rng = np.random.default_rng(4)
    centres = _unit(30, 32, seed=5)
    x = centres[rng.integers(0, 30, 6000)] + rng.normal(size=(6000, 32)).astype(np.float32) * 0.15
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    queries = x[rng.choice(6000, 200, replace=False)] + rng.normal(size=(200, 32)).astype(np.float32) * 0.05
    exact = ExactTopK(queries.astype(np.float32), 100, IP)
    exact.add(np.arange(6000, dtype=np.int64), x)
    truth = exact.result()
    spec = parse_spec("ScaNN60,AH2", 32)
    index = build(spec, x, IP)
    quality = measure(index, spec, queries, truth, 0.95)
    assert quality.recall >= 0.95 and quality.suggestion == quality.search
    timed = [p for p in quality.sweep if "qps_single" in p]
    assert timed and all(p["recall"] >= 0.95 for p in timed)
    fastest = max(timed, key=lambda p: p["qps_single"])
    assert quality.search == {"leaves_to_search": fastest["leaves_to_search"], "reorder": fastest["reorder"]}
    # deeper re-scoring never needs more leaves
    by_depth = sorted((p["reorder"], p["leaves_to_search"]) for p in timed)
    assert [leaves for _, leaves in by_depth] == sorted((leaves for _, leaves in by_depth), reverse=True)
    fixed = measure(index, spec, queries, truth, 0.95, {"reorder": 300})
    assert fixed.search["reorder"] == 300 and {p["reorder"] for p in fixed.sweep} == {300}
    _, labels = as_searcher(index).search(queries, 100)
    assert recall(labels, truth) == pytest.approx(fixed.recall)


def test_scann_is_skipped_cleanly_where_it_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a platform without the package (macOS, arm64): `auto` builds FAISS layouts only, naming ScaNN as skipped,
    and a ScaNN layout is a one-line refusal."""
    import index.auto
    import index.scann_backend

    monkeypatch.setattr(index.auto, "scann_available", lambda: False)
    monkeypatch.setattr(index.scann_backend, "available", lambda: False)
    specs, skipped = candidates(200_000, 64)
    assert [s.factory for s in specs] == ["HNSW32,Flat", "IVF2048,SQ8"] and skipped[0]["factory"] == "ScaNN"
    with pytest.raises(QuiverError, match="ScaNN is not installed here"):
        scann_spec(200_000, 64)
