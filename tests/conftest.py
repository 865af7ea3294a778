"""Shared fixtures: a small synthetic catalog and a tiny DSSM config over it."""

from pathlib import Path

import pytest
import torch
import yaml

from training.data.demo import generate_demo

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    generate_demo(out, n_users=800, n_items=1000, n_categories=12, seed=3)
    return out


def tiny_config(data_dir: Path, out_root: Path, **train: object) -> dict:
    """A small DSSM on the demo catalog: trains in seconds on one core."""
    return {
        "data": {
            "format": "interactions",
            "path": str(data_dir),
            "train": "interactions.parquet",
            "users": "users.parquet",
            "items": "items.parquet",
            "max_seq_len": 20,
        },
        "features": {
            "user": [{"name": "user_id", "kind": "id", "embedding_dim": 8}, {"name": "region", "kind": "id"}],
            "item": [
                {"name": "item_id", "kind": "id", "embedding_dim": 16},
                {"name": "category", "kind": "id", "embedding_dim": 8},
                {"name": "price", "kind": "dense"},
            ],
            "hist": [{"name": "hist_item_id", "kind": "sequence", "shared_with": "item_id", "embedding_dim": 16}],
        },
        "model": {
            "type": "dssm",
            "user_tower": {"hidden_units": [64]},
            "item_tower": {"hidden_units": [64]},
            "output_dim": 16,
            "temperature": 0.1,
        },
        "negatives": {"mode": "sampled", "num": 128},
        "train": {"epochs": 2, "batch_size": 256, "lr": 0.005, "progress": False, **train},
        "output": {"root": str(out_root), "name": "tiny"},
    }


@pytest.fixture
def tiny_config_file(demo_dir: Path, tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_config(demo_dir, tmp_path / "models")))
    return path
