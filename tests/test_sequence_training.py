"""Training the sequence models on every position (DESIGN §4): the per-user rows, their batches, what each row is
scored against, held-out items kept out, and the bundle + index those models produce."""

from pathlib import Path

import numpy as np
import pytest
import torch

from index.build import build
from index.bundle import load_index
from index.options import BuildOptions, PublishOptions
from index.search import search_vectors
from models.bundle import load_bundle
from models.errors import QuiverError
from models.inputs import user_vectors
from models.similarity import mask_collisions, softmax_loss
from tests.conftest import sequence_config
from training.config import parse_config
from training.evaluate import score_queries
from training.examples import encode
from training.sequences import Sequences
from training.trainer import Trainer, fit

# ---------------------------------------------------------------- rows and batches


def test_sequences_are_the_latest_items_right_aligned_in_time_order() -> None:
    # user 0: items 10, 11, 12, 13 at times 4, 1, 2, 3 (out of order); user 1: one item; user 2: items 20, 21 at the
    # same time (row order breaks the tie)
    users = np.array([0, 0, 0, 0, 1, 2, 2])
    items = np.array([10, 11, 12, 13, 30, 20, 21])
    times = np.array([4, 1, 2, 3, 9, 5, 5])
    seq = Sequences.build(users, items, times, length=2)
    assert seq.user_row.tolist() == [0, 2]  # user 1 has nothing to predict
    # width L + 1 = 3, catalog row + 1: user 0's latest three are 12, 13, 10
    assert seq.items.tolist() == [[13, 14, 11], [0, 21, 22]]
    assert seq.positions.tolist() == [2, 1]
    inputs, targets, input_times = seq.take(np.array([0, 1]))
    assert inputs.tolist() == [[13, 14], [0, 21]]
    assert targets.tolist() == [[14, 11], [0, 22]]  # each input's next item; none where the input is padding
    assert input_times.tolist() == [[2, 3], [0, 5]]
    short_inputs, _, _ = seq.take(np.array([1]))
    assert short_inputs.tolist() == [[21]]  # trimmed to the batch's longest row


def test_batches_group_lengths_cover_every_row_once_and_split_evenly_across_ranks() -> None:
    rng = np.random.default_rng(0)
    n = 1000
    users = np.repeat(np.arange(n), rng.integers(2, 30, n))
    seq = Sequences.build(users, rng.integers(0, 50, len(users)), np.arange(len(users)), length=40)
    batches = seq.batches(batch_size=64, seed=1)
    seen = np.concatenate(batches)
    assert sorted(seen.tolist()) == list(range(n))
    spans = [seq.positions[b].max() - seq.positions[b].min() for b in batches]
    assert max(spans) <= 3  # ~36 users per length: a batch of 64 spans two or three (random batches: ~27)
    assert [b.tolist() for b in seq.batches(64, seed=1)] == [b.tolist() for b in batches]  # seeded
    assert [b.tolist() for b in seq.batches(64, seed=2)] != [b.tolist() for b in batches]
    ranks = [seq.batches(64, seed=1, rank=r, world=2) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == len(batches) // 2
    assert not set(np.concatenate(ranks[0]).tolist()) & set(np.concatenate(ranks[1]).tolist())


def test_leave_one_out_items_never_enter_a_training_row(tmp_path: Path) -> None:
    """Every user's items are distinct ids, so a held-out item anywhere in a training row would be a leak."""
    lines = [f"u{u} " + " ".join(f"i{u}_{t}" for t in range(3 + u % 7)) for u in range(60)]
    (tmp_path / "seq.txt").write_text("\n".join(lines) + "\n")
    cfg = sequence_config(tmp_path, tmp_path / "models")
    cfg["data"] = {"format": "sequence_lines", "path": str(tmp_path / "seq.txt"), "max_seq_len": 5}
    cfg["features"] = {
        "item": [{"name": "item_id", "kind": "id", "embedding_dim": 8}],
        "hist": [{"name": "hist_item_id", "kind": "sequence", "shared_with": "item_id", "embedding_dim": 8}],
    }
    cfg["model"]["max_seq_len"] = 5
    cfg["negatives"] = {"mode": "full"}
    trainer = Trainer(parse_config(cfg, "test"))
    enc, seq = trainer.enc, trainer.sequences
    assert seq is not None and enc.valid is not None and enc.test is not None
    held_out = set(enc.valid.truth.indices.tolist()) | set(enc.test.truth.indices.tolist())
    assert len(held_out) == 2 * 60
    rows = set((seq.items[seq.items > 0] - 1).tolist())
    assert not rows & held_out
    for idx in trainer.batches(0):
        inputs, targets, _ = seq.take(idx)
        assert not set((inputs[inputs > 0] - 1).tolist()) & held_out
        assert not set((targets[targets > 0] - 1).tolist()) & held_out
    # Each user's row is their training items in order: i{u}_0 .. i{u}_{n-3}, the latest L + 1 of them.
    ids = np.asarray(enc.items["item_id"].to_pylist())
    users = np.asarray(enc.user_ids.to_pylist())
    for row, user in zip(seq.items, seq.user_row, strict=True):
        u = int(users[user][1:])
        n_train = 3 + u % 7 - 2
        expected = [f"i{u}_{t}" for t in range(n_train)][-6:]
        assert ids[row[row > 0] - 1].tolist() == expected


# ---------------------------------------------------------------- what each row is scored against


def test_mask_collisions_by_hand() -> None:
    logits = torch.zeros(2, 4)
    out = mask_collisions(logits, torch.tensor([5, 7]), torch.tensor([7, 5, 9]), start=1, label_diagonal=False)
    m = torch.finfo(logits.dtype).min
    assert out.tolist() == [[0, 0, m, 0], [0, m, 0, 0]]
    # in-batch: the diagonal is the label itself; row 0's target 5 recurs as row 2's positive
    out = mask_collisions(torch.zeros(3, 3), torch.tensor([5, 6, 5]), torch.tensor([5, 6, 5]), 0, label_diagonal=True)
    assert out.tolist() == [[0, 0, m], [0, 0, 0], [m, 0, 0]]


@pytest.fixture(scope="module")
def sasrec_trainer(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Trainer:
    root = tmp_path_factory.mktemp("seq")
    return Trainer(parse_config(sequence_config(demo_dir, root / "models", num_threads=1), "test"))


def test_a_negative_equal_to_its_rows_target_is_masked_in_the_shared_pool(sasrec_trainer: Trainer) -> None:
    trainer = sasrec_trainer
    rows = trainer.rows(trainer.batches(0)[0])
    scores = trainer.score(rows)
    p = len(rows.positives)
    assert scores.logits.shape == (p, 1 + 128) and (scores.labels == 0).all()
    assert trainer.sampler is not None and not trainer.sampler.exclude_positives  # drawn from the whole catalog
    hit = rows.positives[:, None] == scores.columns[None, :]  # (P, N)
    assert hit.any(), "a pool of 128 over 1,000 popular-skewed items always repeats some batch target"
    floor = torch.finfo(scores.logits.dtype).min
    negatives = scores.logits[:, 1:].detach()
    assert (negatives[torch.from_numpy(hit)] == floor).all()
    assert (negatives[~torch.from_numpy(hit)] > floor).all()
    assert (scores.logits[:, 0] > floor).all()  # the positive column itself is never masked


def test_rows_are_every_valid_position_with_its_next_item(sasrec_trainer: Trainer) -> None:
    trainer = sasrec_trainer
    seq = trainer.sequences
    assert seq is not None
    idx = trainer.batches(0)[3]
    rows = trainer.rows(idx)
    inputs, targets, _ = seq.take(idx)
    assert len(rows.positives) == int((inputs > 0).sum()) == int(seq.positions[idx].sum())
    assert rows.positives.tolist() == (targets[inputs > 0] - 1).tolist()
    model_rows, _ = trainer.model.train_interests(rows.user_batch)
    assert model_rows.shape[0] == len(rows.positives)


@pytest.mark.parametrize("mode", ["full", "mixed", "in_batch"])
def test_full_and_in_batch_layouts(demo_dir: Path, tmp_path: Path, mode: str) -> None:
    cfg = sequence_config(demo_dir, tmp_path / "models", num_threads=1, epochs=1)
    cfg["negatives"] = {"mode": mode, "num": 64, "log_q": False}
    trainer = Trainer(parse_config(cfg, "test"))
    trainer.model.eval()  # no dropout: the logits can be recomputed
    rows = trainer.rows(trainer.batches(0)[0])
    p = len(rows.positives)
    with torch.no_grad():
        scores = trainer.score(rows)
        u = trainer.model.train_interests(rows.user_batch)[0][:, 0]  # (P, D)
        catalog = trainer.model.item_embedding(trainer.enc.item_batch(np.arange(trainer.enc.n_items), trainer.device))
    tau = trainer.model.temperature
    if mode == "full":
        assert scores.logits.shape == (p, trainer.enc.n_items)
        assert torch.allclose(scores.logits, u @ catalog.T / tau, atol=1e-5)
        assert scores.labels.tolist() == rows.positives.tolist()
        return
    n = 64 if mode == "mixed" else 0
    assert scores.logits.shape == (p, p + n) and scores.labels.tolist() == list(range(p))
    dup = rows.positives[:, None] == scores.columns[None, :]
    np.fill_diagonal(dup[:, :p], False)
    assert dup.any()  # popular targets recur within a batch
    floor = torch.finfo(scores.logits.dtype).min
    assert (scores.logits[torch.from_numpy(dup)] == floor).all()
    expected = u @ catalog[torch.from_numpy(scores.columns)].T / tau
    keep = ~torch.from_numpy(dup)
    assert torch.allclose(scores.logits[keep], expected[keep], atol=1e-4)


# ---------------------------------------------------------------- fit, bundle, index


@pytest.mark.parametrize("kind", ["sasrec", "hstu"])
def test_fit_bundle_round_trip_and_index(demo_dir: Path, tmp_path: Path, kind: str) -> None:
    cfg = parse_config(sequence_config(demo_dir, tmp_path / "models", kind, num_threads=1, epochs=2), "test")
    trainer = Trainer(cfg)
    result = trainer.fit()
    assert result.bundle is not None and result.metrics["selected_by"] == "validation"
    history = result.metrics["history"]
    assert history[-1]["loss"] < history[0]["loss"]
    bundle = load_bundle(result.bundle)
    assert bundle.manifest["model_type"] == kind and type(bundle.model).__name__ == type(trainer.model).__name__
    enc = encode(trainer.raw, bundle.encoder, cfg.data, event_histories=False)
    assert enc.valid is not None and enc.test is not None
    again = score_queries(bundle.model, enc, enc.valid, [20], torch.device("cpu")).metrics
    assert np.isclose(again["Recall@20"], result.metrics["valid_Recall@20"])
    test = score_queries(bundle.model, enc, enc.test, [20], torch.device("cpu")).metrics
    assert test["Recall@20"] > 0.02  # above nothing: the demo catalog's popularity sits near 0.03
    # The index serves the bundle's item tower; the user tower reads the bundle's own histories.
    index = load_index(build(result.bundle, tmp_path / "indexes", BuildOptions(factory="Flat"), PublishOptions()).path)
    users = bundle.users.slice(0, 5)
    histories = users["history"].to_pylist()
    vectors, mask = user_vectors(bundle, users.select(["user_id"]), histories)
    assert vectors.shape == (5, 1, bundle.manifest["embedding_dim"] or 16) and mask.all()
    found = search_vectors(index.index, vectors.numpy(), mask.numpy(), 10, [[] for _ in range(5)])
    for labels, scores, _ in found:
        assert len(labels) == 10 and (labels >= 0).all() and np.all(np.diff(scores) <= 1e-6)


def test_sequence_model_config_errors_name_the_key(demo_dir: Path, tmp_path: Path) -> None:
    def refused(match: str, **change: dict) -> None:
        cfg = sequence_config(demo_dir, tmp_path / "models")
        for section, values in change.items():
            cfg[section] = {**cfg.get(section, {}), **values}
        with pytest.raises(QuiverError, match=match):
            parse_config(cfg, "test")

    refused(r"model\.num_block: Extra inputs", model={"num_block": 2})
    refused(r"model\.num_heads: 3 does not divide", model={"num_heads": 3})
    refused(r"model\.max_seq_len: Input should be greater than or equal to 2", model={"max_seq_len": 1})
    refused(r"data\.max_seq_len: a sasrec model needs at least 2", data={"max_seq_len": 1})
    refused(r"model\.max_seq_len: 20 is shorter", data={"max_seq_len": 30})
    refused(r"data\.history: a sasrec model reads the order", data={"history": "others"})
    refused(r"hard_negative\.num_hard", hard_negative={"num_hard": 2, "source": "category"})
    refused(r"model\.layer: Input should be 'prenorm' or 'ligr'", model={"layer": "postnorm"})
    cfg = sequence_config(demo_dir, tmp_path / "models")
    cfg["features"]["user"] = [{"name": "user_id", "kind": "id"}]
    with pytest.raises(QuiverError, match=r"features\.user: a sasrec model"):
        parse_config(cfg, "test")


def test_no_validation_split_saves_the_last_epoch(demo_dir: Path, tmp_path: Path) -> None:
    cfg = sequence_config(demo_dir, tmp_path / "models", num_threads=1, epochs=2)
    cfg["data"] |= {"split": "explicit", "test": "interactions.parquet", "validation": "none"}
    result = fit(parse_config(cfg, "test"))
    assert result.bundle is not None
    assert result.metrics["best_epoch"] == 2 and result.metrics["selected_by"] == "last_epoch"
    cfg["train"]["valid_metric"] = "HR@10"  # asks for a selection the data cannot give: refused before training
    with pytest.raises(QuiverError, match=r"train\.valid_metric: the data has no validation split"):
        Trainer(parse_config(cfg, "test"))


def test_patience_stops_after_epochs_without_a_better_score(demo_dir: Path, tmp_path: Path) -> None:
    cfg = sequence_config(demo_dir, tmp_path / "models", num_threads=1, epochs=30, patience=1, lr=0.5)
    result = fit(parse_config(cfg, "test"))
    epochs = len(result.metrics["history"])
    assert epochs < 30 and epochs == result.metrics["best_epoch"] + 1


def test_hstu_with_time_buckets_trains_on_the_data_clock(demo_dir: Path, tmp_path: Path) -> None:
    cfg = sequence_config(demo_dir, tmp_path / "models", "hstu", num_threads=1, epochs=1)
    cfg["model"]["time_buckets"] = 24
    trainer = Trainer(parse_config(cfg, "test"))
    assert trainer.enc.valid is not None and trainer.enc.valid.hist_time is not None
    q = trainer.enc.valid
    assert ((q.hist > 0) == (q.hist_time > 0)).all()  # a timestamp for every history item, none for padding
    rows = trainer.rows(trainer.batches(0)[0])
    assert "hist_time" in rows.user_batch
    result = trainer.fit()
    assert result.bundle is not None and np.isfinite(result.metrics["valid_Recall@20"])
    bundle = load_bundle(result.bundle)
    assert bundle.model.time_bias is not None and bundle.model.time_bias.abs().sum() > 0  # it learnt something
    times = bundle.users["history_time"].to_pylist()  # the embedded serving state keeps the click times
    assert [len(t) for t in times] == [len(h) for h in bundle.users["history"].to_pylist()]
    assert all(t == sorted(t) for t in times)
    # its recall check reads those times
    build(result.bundle, tmp_path / "indexes", BuildOptions(factory="Flat"), PublishOptions())
    lines = tmp_path / "seq.txt"
    lines.write_text("u1 a b c\nu2 b c d\n")
    cfg["data"] = {"format": "sequence_lines", "path": str(lines), "max_seq_len": 20}
    with pytest.raises(QuiverError, match=r"model\.time_buckets: sequence-line files carry no clock"):
        parse_config(cfg, "test")


def test_every_position_weighs_the_same_whatever_its_batch(sasrec_trainer: Trainer) -> None:
    """A batch's loss is its rows' mean scaled by rows / mean rows per batch: the sum over an epoch is the mean over
    all positions times the number of batches, as with mixed batches."""
    seq = sasrec_trainer.sequences
    assert seq is not None
    batches = seq.batches(64, seed=0)
    mean = seq.mean_rows(64)
    assert mean == pytest.approx(seq.positions.sum() / len(batches), rel=0.05)
    scales = [seq.positions[b].sum() / mean for b in batches]
    assert max(scales) / min(scales) > 2  # short-user and long-user batches differ: the scaling matters
    assert sum(scales) == pytest.approx(len(batches), rel=0.05)


@pytest.mark.parametrize("kind", ["sasrec", "hstu"])
def test_the_item_towers_output_bias_gets_no_gradient_under_the_inner_product(
    demo_dir: Path, tmp_path: Path, kind: str
) -> None:
    # row_shift_parameters(), which train.precision bf16 freezes: the history reads the id table, not item_mlp, so
    # item_mlp's output bias adds u . b to a whole row and the softmax (masked collisions included) cannot move it.
    found = {}
    for similarity in ("inner_product", "cosine"):
        cfg = sequence_config(demo_dir, tmp_path / similarity, kind=kind, num_threads=1, epochs=1)
        cfg["model"]["similarity"] = similarity
        trainer = Trainer(parse_config(cfg, "test"))
        trainer.model.double().eval()
        bias = trainer.model.item_mlp[-1].bias  # type: ignore[index]
        scores = trainer.score(trainer.rows(trainer.batches(0)[0]))
        softmax_loss(scores.logits, scores.labels).backward()
        assert bias.grad is not None
        claimed = [p is bias for p in trainer.model.row_shift_parameters()]
        found[similarity] = (bias.grad.abs().max().item(), claimed)
    assert found["inner_product"][0] < 1e-12 and found["inner_product"][1] == [True]
    assert found["cosine"][0] > 1e-6 and found["cosine"][1] == []
