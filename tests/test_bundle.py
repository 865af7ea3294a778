"""Model bundles (DESIGN §6): round trip, content-hash versions, LATEST, checksums, atomic writes."""

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from models.bundle import LATEST, MANIFEST, WEIGHTS, load_bundle, resolve_bundle, save_bundle, verify_files
from models.dssm import DSSMConfig
from models.errors import QuiverError
from models.features import FeatureEncoder, FeatureGroups
from models.match import MatchModel
from models.publish import LOCK
from models.registry import build_model
from training.data.config import DataConfig
from training.data.schema import RawData, interactions_table
from training.examples import EncodedData, encode

FEATURES = {
    "user": [
        {"name": "user_id", "kind": "id", "embedding_dim": 4},
        {"name": "gender", "kind": "id", "embedding_dim": 2},
    ],
    "item": [
        {"name": "item_id", "kind": "id", "embedding_dim": 6},
        {"name": "category", "kind": "id", "embedding_dim": 3},
        {"name": "brand", "kind": "hash", "num_buckets": 4, "embedding_dim": 2},
        {"name": "price", "kind": "dense"},
    ],
    "hist": [{"name": "hist_item_id", "kind": "sequence", "shared_with": "item_id", "embedding_dim": 6}],
}
MODEL = {
    "type": "dssm",
    "user_tower": {"hidden_units": [8]},
    "item_tower": {"hidden_units": [8], "batch_norm": True},
    "output_dim": 4,
    "similarity": "cosine",
    "temperature": 0.1,
}


def _raw() -> RawData:
    users = ["u1", "u1", "u1", "u2", "u2", "u3", "u3", "u3", "u3"]
    items = ["i1", "i2", "i3", "i2", "i4", "i1", "i5", "i2", "i3"]
    times = [1, 2, 3, 1, 5, 2, 3, 4, 6]
    return RawData(
        train=interactions_table(pa.array(users), pa.array(items), pa.array(times, pa.int64())),
        valid=None,
        test=None,
        users=pa.table({"user_id": ["u1", "u2", "u3"], "gender": ["F", "M", None]}),
        items=pa.table(
            {
                "item_id": ["i1", "i2", "i3", "i4", "i5", "i6"],
                "category": ["a", "a", "b", "b", "c", None],
                "brand": ["x", "y", "x", "z", None, "y"],
                "price": [1.0, 2.5, 3.0, None, 9.0, 4.0],
            }
        ),
        test_negatives=None,
        name="tiny",
    )


def _model_and_data(seed: int = 0) -> tuple[MatchModel, FeatureEncoder, EncodedData]:
    raw = _raw()
    groups = FeatureGroups.model_validate(FEATURES)
    encoder = FeatureEncoder.fit(groups, raw.train, raw.users, raw.items)
    enc = encode(raw, encoder, DataConfig(format="interactions", path=".", max_seq_len=3))
    torch.manual_seed(seed)
    model = build_model(DSSMConfig.model_validate(MODEL), groups, encoder.table_sizes())
    return model.eval(), encoder, enc


def _save(root: Path, model: MatchModel, encoder: FeatureEncoder, enc: EncodedData, **kw: object) -> Path:
    items = enc.items.append_column("popularity", pa.array(enc.popularity.astype(np.int64)))
    users = enc.users.append_column("history", pa.array(enc.recent_items(), pa.list_(pa.string())))
    return save_bundle(root, "tiny", model, dict(MODEL), encoder, items, users, **kw)  # type: ignore[arg-type]


def _leftovers(parent: Path) -> list[str]:
    """Hidden debris: temporary folders and files (the lock file is meant to stay)."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(".") and p.name != LOCK)


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Path, MatchModel, EncodedData]:
    model, encoder, enc = _model_and_data()
    return _save(tmp_path, model, encoder, enc, extra={"metrics": {"Recall@20": 0.5}}), model, enc


def test_round_trip_same_weights_and_same_embeddings(saved: tuple[Path, MatchModel, EncodedData]) -> None:
    path, model, enc = saved
    bundle = load_bundle(path)
    assert not bundle.model.training  # eval mode: BatchNorm uses running statistics
    original, loaded = model.state_dict(), bundle.model.state_dict()
    assert original.keys() == loaded.keys()
    assert all(torch.equal(original[k], loaded[k]) for k in original)

    # the saved encoder encodes the same tables to the same codes
    raw = _raw()
    enc2 = encode(raw, bundle.encoder, DataConfig(format="interactions", path=".", max_seq_len=3))
    for name, values in enc.item_feats.items():
        np.testing.assert_array_equal(values, enc2.item_feats[name])
    for name, values in enc.user_feats.items():
        np.testing.assert_array_equal(values, enc2.user_feats[name])

    dev = torch.device("cpu")
    user_rows = np.arange(3)
    item_rows = np.arange(6)
    with torch.no_grad():
        u1 = model.user_embedding(enc.user_batch(user_rows, enc.recent, dev))
        u2 = bundle.model.user_embedding(enc2.user_batch(user_rows, enc2.recent, dev))
        v1 = model.item_embedding(enc.item_batch(item_rows, dev))
        v2 = bundle.model.item_embedding(enc2.item_batch(item_rows, dev))
    assert u1.shape == (3, 4) and v1.shape == (6, 4)
    assert torch.equal(u1, u2)
    assert torch.equal(v1, v2)

    assert bundle.items.column_names == ["item_id", "category", "brand", "price", "popularity"]
    assert bundle.items["popularity"].to_pylist() == [2, 3, 2, 1, 1, 0]  # training events per catalog item
    assert bundle.users["history"].to_pylist() == [["i1", "i2", "i3"], ["i2", "i4"], ["i5", "i2", "i3"]]
    assert bundle.manifest["metrics"] == {"Recall@20": 0.5}
    assert bundle.manifest["model_type"] == "dssm" and bundle.manifest["similarity"] == "cosine"
    assert bundle.manifest["table_sizes"] == {"user_id": 5, "gender": 4, "item_id": 7, "category": 5, "brand": 6}


def test_version_is_the_content_hash_and_latest_points_at_it(saved: tuple[Path, MatchModel, EncodedData]) -> None:
    path, _, _ = saved
    manifest = json.loads((path / MANIFEST).read_text())
    assert path.name == manifest["version"] and len(path.name) == 16
    content = {k: v for k, v in manifest.items() if k not in ("version", "created_at")}
    expected = hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:16]
    assert path.name == expected
    assert (path.parent / LATEST).read_text().strip() == path.name
    assert resolve_bundle(path.parent) == path
    assert load_bundle(path.parent).version == path.name
    # every file is listed with its checksum
    listed = set(manifest["files"])
    assert {WEIGHTS, "items.parquet", "users.parquet", "vocab/item_id.json", "vocab/brand.json"} <= listed
    assert all(manifest["files"][f] == hashlib.sha256((path / f).read_bytes()).hexdigest() for f in listed)
    verify_files(path, manifest)


def test_same_model_twice_same_version_other_weights_other_version(tmp_path: Path) -> None:
    model, encoder, enc = _model_and_data()
    first = _save(tmp_path, model, encoder, enc)
    second = _save(tmp_path, model, encoder, enc)
    assert first == second
    assert [p.name for p in tmp_path.joinpath("tiny").iterdir() if p.is_dir()] == [first.name]
    other_model, other_encoder, other_enc = _model_and_data(seed=1)
    third = _save(tmp_path, other_model, other_encoder, other_enc)
    assert third != first
    assert (tmp_path / "tiny" / LATEST).read_text().strip() == third.name
    assert sorted(p.name for p in (tmp_path / "tiny").iterdir() if p.is_dir()) == sorted([first.name, third.name])
    assert _leftovers(tmp_path / "tiny") == []


def test_flipped_byte_in_weights_fails_the_checksum(saved: tuple[Path, MatchModel, EncodedData]) -> None:
    path, _, _ = saved
    weights = path / WEIGHTS
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x01  # inside the tensor data, so the file still parses
    weights.write_bytes(bytes(data))
    with pytest.raises(QuiverError, match="checksum") as err:
        load_bundle(path)
    assert WEIGHTS in str(err.value)


def test_missing_file_and_missing_manifest(saved: tuple[Path, MatchModel, EncodedData]) -> None:
    path, _, _ = saved
    (path / "vocab" / "category.json").unlink()
    with pytest.raises(QuiverError, match=re.escape("category.json: missing from the bundle")):
        load_bundle(path)
    (path / MANIFEST).unlink()
    with pytest.raises(QuiverError, match="not a model bundle"):
        load_bundle(path)
    # LATEST still names the version, which no longer has a manifest
    with pytest.raises(QuiverError, match=re.escape(f"names version '{path.name}'")):
        load_bundle(path.parent)


def test_unreadable_manifest_and_not_a_bundle(tmp_path: Path, saved: tuple[Path, MatchModel, EncodedData]) -> None:
    path, _, _ = saved
    (path / MANIFEST).write_text("{not json")
    with pytest.raises(QuiverError, match="unreadable manifest"):
        load_bundle(path)
    with pytest.raises(QuiverError, match="not a model bundle"):
        load_bundle(tmp_path / "nowhere")


def test_no_tmp_folder_after_a_save(saved: tuple[Path, MatchModel, EncodedData]) -> None:
    path, _, _ = saved
    assert _leftovers(path.parent) == []
    assert sorted(p.name for p in path.parent.iterdir()) == sorted([LATEST, LOCK, path.name])


def test_a_failed_save_leaves_no_tmp_folder_and_no_version(tmp_path: Path) -> None:
    model, encoder, enc = _model_and_data()
    # Parquet has no representation for a month-day-nano interval: pq.write_table fails for real, mid-save,
    # after the weights and vocabularies are already in the temporary folder.
    interval = pa.array([pa.MonthDayNano([0, 1, 0])] * enc.items.num_rows, pa.month_day_nano_interval())
    items = enc.items.append_column("shelf_life", interval)
    with pytest.raises(pa.ArrowNotImplementedError):
        save_bundle(tmp_path, "tiny", model, dict(MODEL), encoder, items, enc.users)
    assert list((tmp_path / "tiny").iterdir()) == []  # no .tmp-*, no version, no LATEST
    # a good save afterwards, then a failing one: the published version and LATEST are untouched
    good = _save(tmp_path, model, encoder, enc)
    with pytest.raises(pa.ArrowNotImplementedError):
        save_bundle(tmp_path, "tiny", model, dict(MODEL), encoder, items, enc.users)
    assert sorted(p.name for p in (tmp_path / "tiny").iterdir()) == sorted([LATEST, LOCK, good.name])
    assert (tmp_path / "tiny" / LATEST).read_text().strip() == good.name
    verify_files(good, json.loads((good / MANIFEST).read_text()))


def test_bundle_tables_are_plain_parquet(saved: tuple[Path, MatchModel, EncodedData]) -> None:
    path, _, _ = saved
    users = pq.read_table(path / "users.parquet")
    assert users["user_id"].to_pylist() == ["u1", "u2", "u3"]
    assert users.schema.field("history").type == pa.list_(pa.string())


def test_a_save_that_fails_on_the_pointer_leaves_no_temporary_file(tmp_path: Path) -> None:
    # BUG: write_pointer creates `.LATEST.<random>` with mkstemp and never removes it when os.replace fails (here
    # LATEST is a directory, so the replace raises IsADirectoryError after the version folder was renamed into
    # place): every such failure leaves a stray hidden file in the model folder.
    model, encoder, enc = _model_and_data()
    (tmp_path / "tiny" / LATEST).mkdir(parents=True)
    with pytest.raises(OSError):
        _save(tmp_path, model, encoder, enc)
    parent = tmp_path / "tiny"
    for version in [p for p in parent.iterdir() if p.is_dir() and p.name != LATEST and not p.name.startswith(".")]:
        verify_files(version, json.loads((version / MANIFEST).read_text()))  # published only when complete
    assert _leftovers(parent) == []


def test_serving_inputs_from_the_bundle_alone_match_training(saved: tuple[Path, MatchModel, EncodedData]) -> None:
    """models/inputs.py (what index/ and service/ use) rebuilds the towers' inputs from the bundle's own tables: the
    same vectors as training's arrays, with no training/ code."""
    from models.inputs import item_vectors, user_vectors

    path, model, enc = saved
    bundle = load_bundle(path)
    dev = torch.device("cpu")
    with torch.no_grad():
        u_train = model.user_embedding(enc.user_batch(np.arange(3), enc.recent, dev))
        v_train = model.item_embedding(enc.item_batch(np.arange(6), dev))
    vecs, mask = user_vectors(bundle, bundle.users, bundle.users["history"].to_pylist())
    assert vecs.shape == (3, 1, 4) and mask.all()
    assert torch.allclose(vecs[:, 0], u_train, atol=1e-6)
    batches = list(item_vectors(bundle, batch=4))
    assert [r for r, _ in batches] == [slice(0, 4), slice(4, 6)]  # bounded batches over the catalog
    assert np.allclose(np.concatenate([v for _, v in batches]), v_train.numpy(), atol=1e-6)
    # An unknown history item is out-of-vocabulary, not an error and not padding.
    with_unknown, _ = user_vectors(bundle, bundle.users.slice(0, 1), [["i1", "never-seen"]])
    only_known, _ = user_vectors(bundle, bundle.users.slice(0, 1), [["i1"]])
    assert not torch.allclose(with_unknown, only_known)
