"""A multi-interest (MIND) retriever served: every active interest searched in one call, merged like offline."""

import copy
from pathlib import Path

import httpx
import numpy as np

from index.build import build
from index.bundle import load_index
from index.filter import Attributes
from index.options import BuildOptions, PublishOptions
from index.search import search
from models.bundle import load_bundle
from models.inputs import user_vectors
from tests.conftest import tiny_config
from tests.serving import running, settings
from training.config import parse_config
from training.trainer import fit

MIND = {"type": "mind", "output_dim": 16, "temperature": 0.1, "max_k": 3, "max_seq_len": 20}


def test_mind_recall_merges_every_interest_like_offline(demo_dir: Path, tmp_path: Path) -> None:
    root = tmp_path / "artifacts"
    cfg = tiny_config(demo_dir, root / "models", epochs=1)
    cfg["model"] = copy.deepcopy(MIND)
    path = fit(parse_config(cfg, "test")).bundle
    assert path is not None
    build(path, root / "indexes", BuildOptions(factory="Flat"), PublishOptions())
    bundle = load_bundle(path)
    index = load_index(root / "indexes" / "tiny", model_manifest=bundle.manifest)
    lengths = [len(h) for h in bundle.users["history"].to_pylist()]
    row = int(np.argmax(lengths))  # the longest history: the most active interests
    rec = bundle.users.slice(row, 1).to_pylist()[0]
    history = [str(x) for x in rec["history"]]
    vectors, mask = user_vectors(bundle, bundle.users.slice(row, 1), [history])
    assert int(mask.sum()) > 1
    expected = search(index, vectors.numpy(), 30, mask.numpy(), exclude=[history])[0]
    assert index.attributes is not None
    attrs = Attributes(index.attributes, index.attribute_kinds)
    flt = {"category": sorted(set(index.attributes.column("category").to_pylist()))[:4]}
    passing = attrs.passing(attrs.parse(flt), index.index, index.dim)
    filtered = search(index, vectors.numpy(), 30, mask.numpy(), exclude=[history], passing=passing)[0]
    with running(settings(root, ranker=None)) as url, httpx.Client(base_url=url) as client:
        body = client.post("/recall", json={"user_id": rec["user_id"], "k": 30}).json()
        narrowed = client.post("/recall", json={"user_id": rec["user_id"], "k": 30, "filter": flt}).json()
    # with a filter, the interests still merge like offline, over the passing items only
    assert [i["item_id"] for i in narrowed["items"]] == [h.item_id for h in filtered]
    assert [i["interest"] for i in narrowed["items"]] == [h.interest for h in filtered]
    assert len(filtered) == 30 and all(passing.mask[index.row_of()[h.item_id]] for h in filtered)
    assert [i["item_id"] for i in body["items"]] == [h.item_id for h in expected]
    assert [i["interest"] for i in body["items"]] == [h.interest for h in expected]
    assert len({i["interest"] for i in body["items"]}) > 1  # more than one interest contributed
    assert len({i["item_id"] for i in body["items"]}) == 30
