"""`--index auto` (issue 16): candidates by catalog size, each tuned to the recall floor and timed on the catalog's
own vectors, the fastest published with every candidate's figures in the manifest."""

import json
from pathlib import Path

import faiss
import numpy as np
import pytest

from index.auto import EXACT_ENOUGH_S, HNSW_MAX, candidates, choose, ivf_lists
from index.bundle import load_index
from index.cli import main
from index.factory import parse_spec, scann_spec
from index.quality import ExactTopK, query_vectors
from models.bundle import ModelBundle, load_bundle, save_bundle
from models.inputs import item_vectors
from tests.conftest import tiny_config
from training.config import parse_config
from training.trainer import fit

IP = faiss.METRIC_INNER_PRODUCT
scann = pytest.importorskip("scann")


@pytest.fixture(scope="module")
def model(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> ModelBundle:
    root = tmp_path_factory.mktemp("artifacts") / "models"
    fit(parse_config(tiny_config(demo_dir, root, epochs=1), "test"))
    return load_bundle(root / "tiny")


def _exact(queries: np.ndarray, vectors: np.ndarray, k: int = 100) -> np.ndarray:
    top = ExactTopK(queries, k, IP)
    top.add(np.arange(len(vectors), dtype=np.int64), vectors)
    return top.result()


def test_candidates_by_catalog_size() -> None:
    assert [s.factory for s in candidates(1_000, 16)[0]] == ["Flat"]  # exact costs microseconds: nothing to tune
    mid, skipped = candidates(50_000, 64)
    assert [s.factory for s in mid] == ["Flat", scann_spec(50_000, 64).factory, "HNSW32,Flat", "IVF1024,SQ8"]
    assert not skipped
    big, skipped = candidates(1_000_000, 64)
    assert [s.factory for s in big] == ["ScaNN2000,AH2", "IVF4096,SQ8"]  # the layouts at 1M items
    assert skipped[0]["factory"] == "HNSW32,Flat" and str(HNSW_MAX) in skipped[0]["reason"]
    assert ivf_lists(1_000_000) == 4096 and ivf_lists(100_000) == 1024 and ivf_lists(20_000) == 512


def test_on_a_tiny_catalog_exact_search_wins_by_measured_speed(model: ModelBundle) -> None:
    """Every candidate built and tuned on 1,000 items: the approximate ones reach the floor too, but an exact scan
    of 1,000 items measures well under EXACT_ENOUGH_S a query, so nothing approximate is worth its lost recall."""
    vectors = np.concatenate([v for _, v in item_vectors(model)])  # (1000, 16)
    queries = query_vectors(model, 300, seed=1)
    specs = [parse_spec("Flat", 16), scann_spec(1000, 16), parse_spec("HNSW16", 16)]
    winner, trials = choose(specs, vectors, IP, queries, _exact(queries, vectors), 0.95)
    assert winner.spec.factory == "Flat" and winner.index is not None
    assert [t.spec.factory for t in trials] == ["Flat", "ScaNN10,AH2", "HNSW16,Flat"]
    assert all(t.index is None for t in trials if t is not winner)  # losers are not kept
    contenders = [t for t in trials if t.quality.recall >= 0.95]
    assert len(contenders) == 3 and all(t.qps_single > 0 for t in contenders)
    assert winner.qps_single * EXACT_ENOUGH_S >= 1 and winner.quality.recall == 1.0
    figures = [t.to_json(t is winner) for t in trials]
    assert [f["chosen"] for f in figures] == [True, False, False]
    assert figures[1]["search"].keys() == {"leaves_to_search", "reorder"} and figures[2]["search"].keys() == {
        "efSearch"
    }


def test_an_approximate_index_wins_where_it_is_faster() -> None:
    """40,000 clustered 64-d vectors: exact search costs more than EXACT_ENOUGH_S a query, and a ScaNN tree answers
    several times faster at the floor."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(200, 64)).astype(np.float32)
    x = centres[rng.integers(0, 200, 40_300)] + rng.normal(size=(40_300, 64)).astype(np.float32) * 0.5
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    queries, vectors = x[:300], x[300:]
    specs = [parse_spec("Flat", 64), scann_spec(len(vectors), 64)]
    winner, trials = choose(specs, vectors, IP, queries, _exact(queries, vectors), 0.95)
    assert winner.spec.backend == "scann" and winner.quality.recall >= 0.95
    assert trials[0].qps_single * EXACT_ENOUGH_S < 1 < winner.qps_single / trials[0].qps_single  # measured


def test_auto_through_build_and_rebuild(capsys: pytest.CaptureFixture, model: ModelBundle, tmp_path: Path) -> None:
    models = tmp_path / "models"
    save_bundle(models, "tiny", model.model, model.manifest["model"], model.encoder, model.items, model.users)
    out = tmp_path / "indexes"
    common = ["--models", str(models), "--out", str(out), "--no-progress", "--threads", "1"]
    assert main(["rebuild", *common]) == 0  # no index yet: rebuild's default is auto
    (first,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert first["status"] == "built" and first["index"] == "Flat"
    manifest = load_index(out / "tiny").manifest
    assert manifest["build"]["request"] == "auto" and manifest["build"]["key"]["factory"] == "auto"
    (only,) = manifest["auto"]["candidates"]
    assert only["factory"] == "Flat" and only["chosen"] and only["recall"] == 1.0 and only["qps_single"] > 0
    assert main(["rebuild", *common]) == 0  # the current index asked for auto: asked again, up to date
    (second,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert second["status"] == "up_to_date" and second["version"] == first["version"]
    assert main(["rebuild", *common, "--index", "auto", "--ef-search", "64"]) == 2
    assert "--index auto tunes each candidate's search parameters" in capsys.readouterr().err
