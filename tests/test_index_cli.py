"""`quiver-index` end to end: exit codes and one-line errors, bad input leaving the published index untouched,
rebuild idempotence, and upserts equal to a full rebuild."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from index.bundle import CURRENT, load_index
from index.cli import main
from index.factory import parse_spec
from index.publish import current_version
from index.quality import query_vectors
from index.search import search
from index.upsert import stored_vectors
from models.bundle import ModelBundle, load_bundle, save_bundle
from models.publish import versions
from tests.conftest import tiny_config
from training.config import parse_config
from training.trainer import fit

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def models_root(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("artifacts") / "models"
    fit(parse_config(tiny_config(demo_dir, root, epochs=1), "test"))
    return root


@pytest.fixture(scope="module")
def model(models_root: Path) -> ModelBundle:
    return load_bundle(models_root / "tiny")


def _run(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, list[dict], str]:
    code = main([*args])
    out, err = capsys.readouterr()
    return code, [json.loads(line) for line in out.splitlines() if line.startswith("{")], err


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("quiver-index: error: ") and "Traceback" not in err
    return lines[0]


def _snapshot(root: Path) -> dict[str, str]:
    """Every file under the indexes root with its sha256: what 'untouched' means."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def _copy_model(model: ModelBundle, root: Path, items: pa.Table, name: str = "tiny") -> Path:
    return save_bundle(root, name, model.model, model.manifest["model"], model.encoder, items, model.users)


def test_build_list_verify_search(capsys: pytest.CaptureFixture, models_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "indexes"
    code, (summary,), _ = _run(
        capsys, "build", "--model", str(models_root / "tiny"), "--index", "HNSW16,Flat", "--out", str(out),
        "--no-progress", "--threads", "1",
    )  # fmt: skip
    assert code == 0 and summary["status"] == "built" and summary["recall@100"] >= 0.95
    code, listed, _ = _run(capsys, "list", "--out", str(out))
    assert code == 0 and [(r["version"], r["current"]) for r in listed] == [(summary["version"], True)]
    code, (verified,), _ = _run(capsys, "verify", "--index", str(out / "tiny"), "--models", str(models_root))
    assert code == 0 and verified["status"] == "ok"

    bundle = load_bundle(models_root / "tiny")
    user = bundle.users.slice(0, 1)
    seen = set(user.column("history").to_pylist()[0])
    user_id = str(user.column("user_id")[0])
    code, (found,), _ = _run(
        capsys, "search", "--index", str(out / "tiny"), "--user-id", user_id, "--k", "25", "--models", str(models_root)
    )
    items = [h["item_id"] for h in found["items"]]
    assert code == 0 and len(items) == 25 == len(set(items)) and not seen & set(items)
    scores = [h["score"] for h in found["items"]]
    assert scores == sorted(scores, reverse=True)

    vector = ",".join("0.25" for _ in range(16))
    code, (by_vector,), _ = _run(capsys, "search", "--index", str(out / "tiny"), "--vector", vector, "--k", "3")
    assert code == 0 and len(by_vector["items"]) == 3


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--index", "LSH"], "unknown factory string"),
        (["--index", "IVF16,PQ5"], "PQ5 does not divide the embedding dimension 16"),
        (["--index", "IVF4096,Flat"], "needs at least 4096 items to train, the catalog has 1000"),
        (["--index", "HNSW16", "--nprobe", "4"], "has no search parameter nprobe"),
        (["--index", "IVF16,Flat", "--nprobe", "1"], "below the floor 0.95; use --nprobe"),
        (["--index", "IVF16,PQ2x4", "--recall-floor", "0.999"], "below the floor 0.999"),
    ],
)
def test_bad_build_input_is_one_line_and_leaves_current(
    capsys: pytest.CaptureFixture, models_root: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    out = tmp_path / "indexes"
    base = ["build", "--model", str(models_root / "tiny"), "--out", str(out), "--no-progress", "--threads", "1"]
    assert _run(capsys, *base, "--index", "Flat")[0] == 0
    before = _snapshot(out)
    code, _, err = _run(capsys, *base, *args)
    assert code == 2
    assert message in _one_error_line(err)
    assert _snapshot(out) == before


def test_missing_incomplete_empty_and_mismatched_models(
    capsys: pytest.CaptureFixture, model: ModelBundle, models_root: Path, tmp_path: Path
) -> None:
    out = tmp_path / "indexes"
    common = ["--out", str(out), "--no-progress", "--threads", "1"]
    assert _run(capsys, "build", "--model", str(models_root / "tiny"), "--index", "Flat", *common)[0] == 0
    before = _snapshot(out)

    code, _, err = _run(capsys, "build", "--model", str(tmp_path / "nope"), *common)
    assert code == 2 and "not a model bundle" in _one_error_line(err)

    incomplete = tmp_path / "incomplete" / "tiny"
    shutil.copytree(model.path, incomplete / model.version)
    (incomplete / "LATEST").write_text(model.version + "\n")
    (incomplete / model.version / "items.parquet").unlink()
    code, _, err = _run(capsys, "build", "--model", str(incomplete), "--name", "tiny", *common)
    assert code == 2 and "items.parquet: missing from the bundle" in _one_error_line(err)

    empty = _copy_model(model, tmp_path / "empty", model.items.slice(0, 0))
    code, _, err = _run(capsys, "build", "--model", str(empty), "--name", "tiny", *common)
    assert code == 2 and "the catalog is empty" in _one_error_line(err)

    # A manifest whose embedding_dim disagrees with what the towers produce.
    lying = tmp_path / "lying" / "tiny" / model.version
    shutil.copytree(model.path, lying)
    manifest = json.loads((lying / "manifest.json").read_text())
    manifest["embedding_dim"] = 8
    (lying / "manifest.json").write_text(json.dumps(manifest))
    code, _, err = _run(capsys, "build", "--model", str(lying), "--index", "Flat", "--name", "lying", *common)
    assert code == 2 and "dimension 16, embedding_dim is 8" in _one_error_line(err)

    code, _, err = _run(capsys, "search", "--index", str(out / "tiny"), "--vector", "1,2,3")
    assert code == 2 and "--vector has 3 values, the index dimension is 16" in _one_error_line(err)

    other = _copy_model(model, tmp_path / "other", model.items.slice(0, 500))  # same towers, another version
    code, _, err = _run(capsys, "verify", "--index", str(out / "tiny"), "--model", str(other))
    assert code == 2 and "built for model version" in _one_error_line(err)
    assert _snapshot(out) == before


def test_unexpected_failure_exits_1(capsys: pytest.CaptureFixture, models_root: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code, _, err = _run(
        capsys, "build", "--model", str(models_root / "tiny"), "--index", "Flat", "--out", str(blocker / "indexes"),
        "--no-progress",
    )  # fmt: skip
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("quiver-index: failed: ")


def test_rebuild_is_idempotent(capsys: pytest.CaptureFixture, model: ModelBundle, tmp_path: Path) -> None:
    models = tmp_path / "models"
    _copy_model(model, models, model.items)
    out = tmp_path / "indexes"
    args = ["rebuild", "--models", str(models), "--out", str(out), "--no-progress", "--threads", "1"]
    code, (first,), _ = _run(capsys, *args, "--index", "HNSW16")
    assert code == 0 and first["status"] == "built"
    pointer = out / "tiny" / CURRENT
    stamp = pointer.stat().st_mtime_ns
    before = _snapshot(out)
    code, (second,), _ = _run(capsys, *args)  # keeps the current index's factory string
    assert code == 0 and second["status"] == "up_to_date" and second["version"] == first["version"]
    assert second["index"] == "HNSW16,Flat"
    assert pointer.stat().st_mtime_ns == stamp and _snapshot(out) == before
    # A newer model bundle (LATEST moves): rebuilt, and the new index pairs with the new model.
    newer = _copy_model(model, models, model.items.slice(0, 900))
    code, (third,), _ = _run(capsys, *args)
    assert code == 0 and third["status"] == "built" and third["model_version"] == newer.name
    assert load_index(out / "tiny", model_version=newer.name).index.ntotal == 900
    code, _, err = _run(capsys, "rebuild", "--models", str(tmp_path / "none"), "--out", str(out))
    assert code == 2 and "no such models folder" in _one_error_line(err)


def test_hnsw_build_breadth_is_recorded_kept_by_rebuild_and_by_upsert(
    capsys: pytest.CaptureFixture, model: ModelBundle, tmp_path: Path
) -> None:
    models = tmp_path / "models"
    _copy_model(model, models, model.items)
    out = tmp_path / "indexes"
    args = ["rebuild", "--models", str(models), "--out", str(out), "--no-progress", "--threads", "1"]
    code, (first,), _ = _run(capsys, *args, "--index", "HNSW16", "--ef-construction", "64")
    assert code == 0 and first["status"] == "built"
    published = load_index(out / "tiny")
    assert published.manifest["index"]["params"] == {"M": 16, "efConstruction": 64}
    assert faiss.downcast_index(published.index.index).hnsw.efConstruction == 64  # the graph was built with it
    code, (same,), _ = _run(capsys, *args)  # keeps the current breadth, like the current layout
    assert code == 0 and same["status"] == "up_to_date" and same["version"] == first["version"]
    code, (wider,), _ = _run(capsys, *args, "--ef-construction", "100")  # another graph: another version
    assert code == 0 and wider["status"] == "built" and wider["version"] != first["version"]
    # An upsert rebuilds the HNSW graph with the breadth the published one has.
    delta = tmp_path / "delta.parquet"
    pq.write_table(_changed(model.items, [3, 7]), delta)
    code, _, _ = _run(capsys, "add", "--index", str(out / "tiny"), "--items", str(delta),
                             "--models", str(models), "--no-progress", "--allow-low-recall")  # fmt: skip
    assert code == 0
    assert faiss.downcast_index(load_index(out / "tiny").index.index).hnsw.efConstruction == 100
    code, _, err = _run(capsys, *args, "--index", "IVF16,Flat", "--ef-construction", "64")
    assert code == 2 and "efConstruction is an HNSW build parameter" in _one_error_line(err)


def test_rebuild_through_the_console_entry_point(model: ModelBundle, tmp_path: Path) -> None:
    """What the compose job runs: `quiver-index rebuild` with only $QUIVER_ARTIFACTS set."""
    _copy_model(model, tmp_path / "models", model.items)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "QUIVER_ARTIFACTS": str(tmp_path)}
    env.pop("QUIVER_REDIS_URL", None)
    cmd = [sys.executable, "-m", "index.cli", "rebuild", "--no-progress", "--index", "Flat", "--threads", "1"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["status"] == "built"
    assert current_version(tmp_path / "indexes" / "tiny") is not None


def _changed(items: pa.Table, rows: list[int]) -> pa.Table:
    """The same items with a different price (a dense feature: the item tower's output moves)."""
    price = items.column("price").to_numpy(zero_copy_only=False).astype(np.float64)
    price[rows] = price[rows] * 3.0 + 50.0
    return items.set_column(
        items.column_names.index("price"), "price", pa.array(price, items.schema.field("price").type)
    )


@pytest.mark.parametrize("factory", ["Flat", "HNSW16", "IVF8,Flat", "scann"])
def test_upsert_equals_a_full_rebuild(
    capsys: pytest.CaptureFixture, model: ModelBundle, tmp_path: Path, factory: str
) -> None:
    items = model.items.drop_columns(["popularity"]) if "popularity" in model.items.column_names else model.items
    changed_rows = [3, 10, 200]
    full = _changed(items, changed_rows)  # the catalog after the update: 1000 items, 3 with a new price
    base = _copy_model(model, tmp_path / "base", items.slice(0, 950))  # before: 950 items, old prices
    ref = _copy_model(model, tmp_path / "ref", full)
    delta = pa.concat_tables([full.take(changed_rows), full.slice(950)])  # 3 changed + 50 new
    pq.write_table(delta, tmp_path / "delta.parquet")

    out = tmp_path / "indexes"
    common = ["--no-progress", "--threads", "1"]
    code, (built,), _ = _run(capsys, "build", "--model", str(base), "--index", factory, "--out", str(out), *common)
    assert code == 0
    before = _snapshot(out)
    code, (added,), err = _run(
        capsys, "add", "--index", str(out / "tiny"), "--items", str(tmp_path / "delta.parquet"), "--model", str(base),
        *common,
    )  # fmt: skip
    assert code == 0, err
    assert added["num_items"] == 1000 and added["version"] != built["version"]
    assert current_version(out / "tiny") == added["version"]
    assert all(_snapshot(out)[k] == v for k, v in before.items() if CURRENT not in k)  # old version intact
    manifest = json.loads((out / "tiny" / added["version"] / "manifest.json").read_text())
    assert manifest["upsert"]["new"] == 50 and manifest["upsert"]["changed"] == 3
    assert manifest["parent_version"] == built["version"] and manifest["base_version"] == built["version"]

    ref_out = tmp_path / "ref-indexes"
    assert _run(capsys, "build", "--model", str(ref), "--index", factory, "--out", str(ref_out), *common)[0] == 0
    upserted = load_index(out / "tiny")
    rebuilt = load_index(ref_out / "tiny")
    queries = query_vectors(load_bundle(ref), 200, seed=5)
    got = search(upserted, queries, 20)
    want = search(rebuilt, queries, 20)
    if factory == "Flat":  # exact: the same neighbours with the same scores
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose([h.score for h in g], [h.score for h in w], rtol=1e-5, atol=1e-6)
            assert {h.item_id for h in g} == {h.item_id for h in w}
    # Every layout: the upserted index holds exactly the vectors a full rebuild holds, item for item.
    spec = parse_spec(built["index"])  # the layout `scann` resolved to
    if spec.backend == "scann":  # its tree was trained again: search parameters tuned to the floor again
        assert upserted.manifest["index"]["search"] == upserted.manifest["quality"]["search"]
        assert upserted.manifest["quality"]["recall"] >= upserted.manifest["quality"]["floor"]
    else:
        assert upserted.manifest["index"]["search"] == built["search"]  # an upsert is not a different index
    held = {}
    for bundle in (upserted, rebuilt):
        labels, vectors = stored_vectors(bundle.index, spec)
        held[bundle.version] = dict(zip(bundle.ids[labels].tolist(), vectors, strict=True))
    mine, theirs = held[upserted.version], held[rebuilt.version]
    assert mine.keys() == theirs.keys() and len(mine) == 1000
    # ... and the same filterable attributes, item for item (the changed prices and the new items' rows included)
    assert upserted.attributes is not None and rebuilt.attributes is not None
    assert upserted.attribute_kinds == rebuilt.attribute_kinds == {"category": "categorical", "brand": "categorical",
                                                                   "price": "numeric"}  # fmt: skip
    attrs = {b.version: dict(zip(b.ids.tolist(), b.attributes.to_pylist(), strict=True)) for b in (upserted, rebuilt)}
    assert attrs[upserted.version] == attrs[rebuilt.version]
    np.testing.assert_allclose(np.stack([mine[i] for i in theirs]), np.stack(list(theirs.values())), atol=1e-6)
    # Applying the same delta again is a no-op.
    code, (again,), _ = _run(
        capsys, "add", "--index", str(out / "tiny"), "--items", str(tmp_path / "delta.parquet"), "--model", str(base),
        *common,
    )  # fmt: skip
    assert code == 0 and again["status"] == "up_to_date" and again["version"] == added["version"]
    # The changed items really moved: their stored vectors differ from the base version's.
    old = load_index(out / "tiny" / built["version"])
    moved = str(items.column("item_id")[changed_rows[0]])
    old_labels, old_vectors = stored_vectors(old.index, spec)
    before_vectors = dict(zip(old.ids[old_labels].tolist(), old_vectors, strict=True))
    assert not np.allclose(before_vectors[moved], mine[moved])


def test_upsert_of_attributes_alone_publishes_them(
    capsys: pytest.CaptureFixture, model: ModelBundle, tmp_path: Path
) -> None:
    """An item re-sent with a new attribute no tower reads (stock) keeps its vector, but a filter must see the new
    value: the upsert publishes a version whose attributes changed and whose index did not."""
    items = model.items.drop_columns(["popularity"])
    stock = pa.array([i % 2 == 0 for i in range(items.num_rows)])
    base = _copy_model(model, tmp_path / "base", items.append_column("in_stock", stock))
    out, common = tmp_path / "indexes", ["--no-progress", "--threads", "1"]
    code, (built,), _ = _run(capsys, "build", "--model", str(base), "--index", "Flat", "--out", str(out), *common)
    assert code == 0
    flipped = [0, 2, 4]
    delta = items.take(flipped).append_column("in_stock", pa.array([False, False, False]))
    pq.write_table(delta, tmp_path / "delta.parquet")
    code, (added,), err = _run(
        capsys, "add", "--index", str(out / "tiny"), "--items", str(tmp_path / "delta.parquet"), "--model", str(base),
        *common,
    )  # fmt: skip
    assert code == 0, err
    assert added["version"] != built["version"] and current_version(out / "tiny") == added["version"]
    before, after = load_index(out / "tiny" / built["version"]), load_index(out / "tiny")
    assert before.attribute_kinds["in_stock"] == "boolean"  # a bundle that records none: every comparable column
    assert after.manifest["upsert"]["items"] == 0  # no vector moved
    got = dict(zip(after.ids.tolist(), after.attributes.column("in_stock").to_pylist(), strict=True))
    ids = items.column("item_id").to_pylist()
    assert [got[ids[r]] for r in flipped] == [False] * 3 and got[ids[6]] is True
    spec = parse_spec("Flat")
    np.testing.assert_array_equal(stored_vectors(before.index, spec)[1], stored_vectors(after.index, spec)[1])


def test_upsert_bad_input(capsys: pytest.CaptureFixture, model: ModelBundle, models_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "indexes"
    common = ["--no-progress", "--threads", "1"]
    assert (
        _run(capsys, "build", "--model", str(models_root / "tiny"), "--index", "Flat", "--out", str(out), *common)[0]
        == 0
    )
    before = _snapshot(out)
    empty = tmp_path / "empty.parquet"
    pq.write_table(model.items.slice(0, 0), empty)
    no_price = tmp_path / "no_price.parquet"
    pq.write_table(model.items.slice(0, 5).drop_columns(["price"]), no_price)
    dupes = tmp_path / "dupes.parquet"
    pq.write_table(pa.concat_tables([model.items.slice(0, 2), model.items.slice(0, 2)]), dupes)
    for path, message in [
        (empty, "no items to add"),
        (no_price, "missing catalog column(s) price"),
        (dupes, "item_id has duplicates"),
        (tmp_path / "absent.parquet", "not a readable Parquet item table"),
    ]:
        code, _, err = _run(
            capsys, "add", "--index", str(out / "tiny"), "--items", str(path), "--models", str(models_root), *common
        )
        assert code == 2 and message in _one_error_line(err)
    assert _snapshot(out) == before
    assert len(versions(out / "tiny")) == 1


def test_rebuild_skips_rankers_and_reports_broken_models(
    capsys: pytest.CaptureFixture, model: ModelBundle, tmp_path: Path
) -> None:
    models = tmp_path / "models"
    _copy_model(model, models, model.items)
    ranker = _copy_model(model, models, model.items, name="ranker")
    manifest = json.loads((ranker / "manifest.json").read_text())
    manifest["similarity"], manifest["model_type"] = None, "tdm"  # what a TDM ranker bundle declares
    (ranker / "manifest.json").write_text(json.dumps(manifest))
    (models / "broken").mkdir()
    (models / "broken" / "LATEST").write_text("0000000000000000\n")
    out = tmp_path / "indexes"
    args = ["rebuild", "--models", str(models), "--out", str(out), "--index", "Flat", "--no-progress", "--threads", "1"]
    code, lines, err = _run(capsys, *args)
    assert code == 2  # one model had bad input; the others were still handled
    by_status = {line["status"]: line for line in lines}
    assert by_status["built"]["name"] == "tiny" and "not a retrieval model" in by_status["skipped"]["reason"]
    assert "names version '0000000000000000', which has no manifest.json" in _one_error_line(err)
    assert current_version(out / "tiny") == by_status["built"]["version"] and not (out / "ranker").exists()
    code, _, err = _run(capsys, *args, "--model", str(models / "ranker"))
    assert code == 2 and "has no item vectors to index" in _one_error_line(err)


def test_rebuild_replaces_a_damaged_current(capsys: pytest.CaptureFixture, model: ModelBundle, tmp_path: Path) -> None:
    models = tmp_path / "models"
    _copy_model(model, models, model.items)
    out = tmp_path / "indexes"
    args = ["rebuild", "--models", str(models), "--out", str(out), "--no-progress", "--threads", "1"]
    code, (first,), _ = _run(capsys, *args, "--index", "Flat")
    assert code == 0
    damaged = out / "tiny" / first["version"] / "index.faiss"
    damaged.write_bytes(damaged.read_bytes()[:-64])
    code, (second,), _ = _run(capsys, *args)  # keeps Flat from the damaged CURRENT's manifest
    assert code == 0 and second["status"] == "built" and second["version"] == first["version"]
    assert load_index(out / "tiny").index.ntotal == 1000
    assert not [p.name for p in (out / "tiny").iterdir() if p.name.startswith((".trash", ".tmp"))]
