"""Layouts: the closed set Quiver builds (FAISS factory strings and ScaNN trees), their canonical form, and one-line
refusals."""

import tomllib
from pathlib import Path

import faiss
import numpy as np
import pytest
from packaging.requirements import Requirement

from index.factory import build_index, ef_construction_of, empty_index, metric_for, parse_spec
from models.errors import QuiverError


@pytest.mark.parametrize(
    ("text", "factory", "kind", "params"),
    [
        ("Flat", "Flat", "flat", {}),
        ("HNSW32", "HNSW32,Flat", "hnsw", {"M": 32, "efConstruction": 200}),
        (" HNSW16, Flat ", "HNSW16,Flat", "hnsw", {"M": 16, "efConstruction": 200}),
        ("IVF100,Flat", "IVF100,Flat", "ivf_flat", {"nlist": 100}),
        ("IVF64,PQ8", "IVF64,PQ8x8", "ivf_pq", {"nlist": 64, "m": 8, "nbits": 8}),
        ("IVF64,PQ8x4", "IVF64,PQ8x4", "ivf_pq", {"nlist": 64, "m": 8, "nbits": 4}),
        ("IVF100,SQ8", "IVF100,SQ8", "ivf_sq", {"nlist": 100}),
        (
            "ScaNN200",
            "ScaNN200,AH2",
            "scann",
            {"leaves": 200, "dims_per_block": 2, "anisotropic_threshold": 0.2, "training_sample": 1_000_000},
        ),
        (
            "ScaNN50, AH4",
            "ScaNN50,AH4",
            "scann",
            {"leaves": 50, "dims_per_block": 4, "anisotropic_threshold": 0.2, "training_sample": 1_000_000},
        ),
    ],
)
def test_canonical_forms(text: str, factory: str, kind: str, params: dict[str, int]) -> None:
    spec = parse_spec(text, dim=32)
    assert (spec.factory, spec.kind, spec.params) == (factory, kind, params)
    assert parse_spec(spec.factory, dim=32) == spec  # canonical is a fixed point: versions hash it


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("IVF100,SQ4", "unknown factory string"),
        ("scann2000", "unknown factory string"),
        ("OPQ16,IVF64,PQ16", "unknown factory string"),
        ("flat", "unknown factory string"),
        ("HNSW2", "M must be between 4 and 256"),
        ("IVF0,Flat", "nlist must be at least 1"),
        ("IVF64,PQ8x20", "1 <= bits <= 16"),
        ("IVF64,PQ7", "PQ7 does not divide the embedding dimension 32"),
        ("ScaNN0", "at least 1 leaf"),
        ("ScaNN100,AH3", "AH3 does not divide the embedding dimension 32"),
    ],
)
def test_refusals_are_one_line(text: str, message: str) -> None:
    with pytest.raises(QuiverError, match=message) as err:
        parse_spec(text, dim=32)
    assert "\n" not in str(err.value)


def test_hnsw_build_breadth_is_a_recorded_parameter() -> None:
    spec = parse_spec("HNSW16", ef_construction=64)
    assert spec.params == {"M": 16, "efConstruction": 64} and spec != parse_spec("HNSW16")
    index = empty_index(spec, 8, faiss.METRIC_INNER_PRODUCT)
    assert ef_construction_of(index) == 64 and ef_construction_of(empty_index(parse_spec("Flat"), 8, 0)) is None
    with pytest.raises(QuiverError, match="efConstruction is an HNSW build parameter"):
        parse_spec("IVF64,Flat", ef_construction=64)
    with pytest.raises(QuiverError, match="efConstruction must be at least 1"):
        parse_spec("HNSW16", ef_construction=0)


def test_knob_and_sweep() -> None:
    assert parse_spec("Flat").search_params == () and parse_spec("Flat").sweep(100) == []
    assert parse_spec("HNSW32").search_params == ("efSearch",)
    # efSearch below k is pointless; ~1.4x steps, so the cheapest value reaching the floor is not overshot by 2x
    assert parse_spec("HNSW32").sweep(100) == [100, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048]
    assert parse_spec("IVF48,Flat").sweep(100) == [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48]  # ends exhaustive
    assert parse_spec("IVF64,PQ8").min_items() == 256  # PQ codebooks need 2^bits points
    scann = parse_spec("ScaNN300")
    assert scann.backend == "scann" and scann.search_params == ("leaves_to_search", "reorder")
    assert scann.min_items() == 300 and parse_spec("ScaNN4").min_items() == 16  # 16 centres per AH codebook


def test_metrics() -> None:
    assert metric_for("cosine") == metric_for("inner_product") == faiss.METRIC_INNER_PRODUCT
    with pytest.raises(QuiverError, match="no FAISS metric"):
        metric_for("hamming")


def test_build_labels_are_rows_and_ivf_trains_on_the_sample() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)  # unit vectors: each one's best inner product is itself
    spec = parse_spec("IVF4,Flat")
    batches = [(np.arange(s, s + 100, dtype=np.int64), x[s : s + 100]) for s in range(0, 300, 100)]
    index, on_gpu = build_index(spec, 8, faiss.METRIC_INNER_PRODUCT, batches, sample=x[:200], gpu=False)
    assert not on_gpu and index.ntotal == 300 and index.is_trained
    faiss.extract_index_ivf(index).nprobe = 4  # exhaustive: each vector finds itself
    _, labels = index.search(x[[5, 150, 299]], 1)
    assert labels.ravel().tolist() == [5, 150, 299]
    with pytest.raises(QuiverError, match="needs at least 4 items to train"):
        build_index(spec, 8, faiss.METRIC_INNER_PRODUCT, [], sample=x[:3], gpu=False)
    flat = empty_index(parse_spec("Flat"), 8, faiss.METRIC_INNER_PRODUCT)
    assert isinstance(flat, faiss.IndexIDMap2)


def test_scann_is_a_dependency_on_linux_x86_64_only() -> None:
    """pip installs ScaNN where it has wheels; elsewhere FAISS serves alone (index/auto.py skips ScaNN there)."""
    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    (scann,) = [Requirement(d) for d in project["dependencies"] if Requirement(d).name == "scann"]
    assert scann.marker is not None
    assert scann.marker.evaluate({"sys_platform": "linux", "platform_machine": "x86_64"})
    for platform, machine in [("linux", "aarch64"), ("darwin", "arm64"), ("darwin", "x86_64"), ("win32", "AMD64")]:
        assert not scann.marker.evaluate({"sys_platform": platform, "platform_machine": machine})
