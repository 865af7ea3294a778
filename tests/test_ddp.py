"""Data-parallel training with two CPU processes (gloo): gradients are averaged, so both ranks end with identical
weights, and only rank 0 writes the bundle."""

import hashlib
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from tests.conftest import sequence_config, tiny_config
from training.config import parse_config
from training.trainer import Trainer


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, cfg_dict: dict, out: str) -> None:
    os.environ |= {"WORLD_SIZE": str(world), "RANK": str(rank), "LOCAL_RANK": str(rank)}
    os.environ |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    torch.set_num_threads(1)
    cfg = parse_config(cfg_dict, "test")
    trainer = Trainer(cfg)
    steps = len(trainer.batches(0))
    result = trainer.fit()
    digest = hashlib.sha256()
    for name, tensor in sorted(trainer.model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().numpy().tobytes())
    Path(out, f"rank{rank}.txt").write_text(f"{digest.hexdigest()} {steps} {result.bundle}")
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("kind", ["dssm", "sasrec"])
def test_two_process_ddp_keeps_ranks_in_sync(demo_dir: Path, tmp_path: Path, kind: str) -> None:
    """Events for the pooled towers; user sequences grouped by length for the sequence models."""
    if kind == "dssm":
        cfg_dict = tiny_config(demo_dir, tmp_path / "models", epochs=1)
    else:
        cfg_dict = sequence_config(demo_dir, tmp_path / "models", epochs=1)
    mp.spawn(_worker, args=(2, _free_port(), cfg_dict, str(tmp_path)), nprocs=2, join=True)
    r0 = (tmp_path / "rank0.txt").read_text().split()
    r1 = (tmp_path / "rank1.txt").read_text().split()
    assert r0[0] == r1[0], "weights differ across ranks: gradients were not synchronised"
    assert r0[1] == r1[1] and int(r0[1]) > 0  # equal shard sizes, so both ranks take the same number of steps
    assert r0[2] != "None" and Path(r0[2], "manifest.json").is_file()
    assert r1[2] == "None"  # only rank 0 writes the bundle


def test_shards_partition_the_epoch(demo_dir: Path, tmp_path: Path) -> None:
    cfg = parse_config(tiny_config(demo_dir, tmp_path / "models"), "test")
    trainer = Trainer(cfg)
    n = len(trainer.enc.train.user_row)
    trainer.world = 2
    shards = []
    for rank in (0, 1):
        trainer.rank = rank
        shards.append(trainer.shard(0))
    assert len(shards[0]) == len(shards[1]) == n // 2
    assert not set(shards[0]) & set(shards[1])
