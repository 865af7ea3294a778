"""TDM end to end on the demo catalog: a tiny DSSM retriever, a tiny TDM fit, the bundle, serving `score`,
`quiver-train eval-rerank`, and config errors."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from models.bundle import load_bundle
from models.embedding import FeatureEmbedding
from models.errors import QuiverError
from models.inputs import user_vectors
from models.rank import MAX_CANDIDATES, Ranker, score
from models.tdm import TDM
from tests.conftest import tdm_config, tiny_config
from training.cli import main
from training.config import parse_config
from training.ranking import Csr
from training.tdm_config import parse_tdm_config
from training.tdm_data import NegativeMixer, catalog_vectors, exclude_also, row_ids
from training.tdm_trainer import TDMTrainer, copy_embeddings, tdm_user_batch
from training.trainer import fit

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def trained(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("tdm")
    retriever = fit(parse_config(tiny_config(demo_dir, root / "models"), "test")).bundle
    assert retriever is not None
    cfg_dict = tdm_config(demo_dir, root / "models", retriever)
    trainer = TDMTrainer(parse_tdm_config(cfg_dict, "test"))
    result = trainer.fit()
    return {"root": root, "retriever": retriever, "trainer": trainer, "result": result, "cfg": cfg_dict}


def test_fit_keeps_the_best_epoch_and_learns(trained: dict) -> None:
    metrics = trained["result"].metrics
    history = metrics["history"]
    assert len(history) == 3
    best = max(history, key=lambda e: e["valid_gauc"])
    assert metrics["best_epoch"] == best["epoch"]
    assert metrics["valid_gauc"] == best["valid_gauc"] > 0.6  # clearly better than chance on held-out clicks
    assert all(0.0 <= e["valid_auc"] <= 1.0 for e in history)
    # The goal's own measure on validation users: their retrieved candidates, reordered by TDM.
    assert all(0.0 <= e["valid_rerank_NDCG@10"] <= 1.0 for e in history)
    assert len({e["valid_retrieval_NDCG@10"] for e in history}) == 1  # the retrieval order does not train
    # The saved weights reproduce the best epoch's validation score.
    assert trained["trainer"].validate()["gauc"] == pytest.approx(best["valid_gauc"], abs=1e-9)
    manifest = json.loads((trained["result"].bundle / "manifest.json").read_text())
    assert manifest["model_type"] == "tdm" and manifest["similarity"] is None
    assert manifest["retriever_version"] == trained["retriever"].name


def test_retrieved_negatives_come_from_the_pool_and_never_equal_the_click(trained: dict) -> None:
    mixer: NegativeMixer = trained["trainer"].mixer
    assert mixer.pool is not None and mixer.pool.shape[1] == 50
    users = np.arange(40)
    positive = mixer.pool[users, 0]  # the worst case: the click is the pool's first item
    neg = mixer.sample(users, positive, 4)  # 2 retrieved + 2 popular per click
    assert neg.shape == (40, 4)
    assert not (neg == positive[:, None]).any()
    from_pool = [(neg[i, :2, None] == mixer.pool[u][None, :]).any(1).all() for i, u in enumerate(users)]
    assert np.mean(from_pool) > 0.9  # the rest are redraws of collisions


@pytest.fixture(scope="module")
def click_trainer(trained: dict) -> TDMTrainer:
    """A trainer whose negatives come from each click's own retrieved list, training only on listed clicks."""
    cfg = json.loads(json.dumps(trained["cfg"]))
    cfg["negatives"] |= {"retrieved_from": "click", "positives": "retrieved"}
    cfg["train"] |= {"epochs": 1}
    return TDMTrainer(parse_tdm_config(cfg, "test"))


def test_click_lists_are_the_retrievers_top_k_for_the_history_each_click_saw(
    trained: dict, click_trainer: TDMTrainer
) -> None:
    clicks = click_trainer.clicks
    assert clicks is not None and clicks.k == 50
    enc, retriever = click_trainer.enc, load_bundle(trained["retriever"])
    ev = enc.train
    idx = np.random.default_rng(1).choice(len(ev.user_row), 25, replace=False)
    lists, listed = clicks.top(idx, ev.user_row[idx], ev.item_row[idx])
    items, unknown = catalog_vectors(retriever, enc.items)
    assert unknown.size == 0
    for r, i in enumerate(idx):  # brute force, one click at a time, from the click's own history
        u, _ = user_vectors(retriever, enc.users.take([int(ev.user_row[i])]), row_ids(enc.items, ev.hist[[i]]))
        scores = items @ u[0, 0].numpy()  # (I,)
        clicked = ev.item_row[ev.user_row == ev.user_row[i]]  # the user's training clicks: never in a list
        allowed = np.setdiff1d(np.arange(len(items)), clicked)
        want = allowed[np.argsort(-scores[allowed], kind="stable")][:50]
        assert set(lists[r].tolist()) == set(want.tolist())
        np.testing.assert_allclose(np.sort(scores[lists[r]])[::-1], scores[want], rtol=1e-5, atol=1e-6)
        rank = (scores[allowed] > scores[ev.item_row[i]]).sum()  # items above the click among those allowed
        assert listed[r] == (rank < 50)


def test_retrieved_positives_train_only_on_the_clicks_their_list_holds(click_trainer: TDMTrainer) -> None:
    ev, k = click_trainer.enc.train, click_trainer.cfg.negatives.per_positive
    idx = np.arange(200)
    clicks = click_trainer.clicks
    assert clicks is not None
    _, listed = clicks.top(idx, ev.user_row[idx], ev.item_row[idx])
    assert 0 < listed.sum() < len(idx)  # some clicks fall outside their list and must be skipped
    _, examples = click_trainer.step(idx)
    assert examples == int(listed.sum()) * (1 + k)
    result = click_trainer.fit()
    assert np.isfinite(result.metrics["history"][0]["loss"]) and result.metrics["history"][0]["examples"] > 0


def test_rerank_validation_is_a_random_subset_of_validation_users(trained: dict) -> None:
    cfg = json.loads(json.dumps(trained["cfg"]))
    cfg["train"] |= {"epochs": 1, "valid_rerank_users": 40}
    trainer = TDMTrainer(parse_tdm_config(cfg, "test"))
    assert trainer.valid_pool is not None and trainer.enc.valid is not None
    users, hist, cands, truth = trainer.valid_pool
    q = trainer.enc.valid
    assert len(users) == 40 < len(q.user_row) and not np.array_equal(users, q.user_row[:40])  # not the head
    row = {int(u): i for i, u in enumerate(q.user_row)}
    for j, u in enumerate(users.tolist()):  # each picked user keeps its own history, candidates and truth
        assert np.array_equal(hist[j], q.hist[row[u]]) and np.array_equal(truth.row(j), q.truth.row(row[u]))
        assert np.array_equal(cands[j], trainer.mixer.pool[u])


def test_csr_rows_and_columns_for_every_row() -> None:
    c = Csr.from_pairs(np.array([0, 0, 2]), np.array([5, 1, 3]), 3)
    taken = c.take(np.array([2, 0, 2, 1]))
    assert [taken.row(i).tolist() for i in range(4)] == [[3], [1, 5], [3], []]
    wider = exclude_also(c, np.array([7, 1]))
    assert [wider.row(i).tolist() for i in range(3)] == [[1, 5, 7], [1, 7], [1, 3, 7]]
    assert exclude_also(c, np.zeros(0, np.int64)) is c


def test_frozen_retriever_tables_stay_the_retrievers(trained: dict) -> None:
    cfg = json.loads(json.dumps(trained["cfg"]))
    cfg["train"] |= {"epochs": 1, "init_from_retriever": True, "freeze_initialised": True}
    trainer = TDMTrainer(parse_tdm_config(cfg, "test"))
    before = {n: t.weight.detach().clone() for n, t in trainer.model.embedding.tables.items()}
    attention = trainer.model.attention[0].weight.detach().clone()
    trainer.fit()
    for name in trainer.initialised:
        assert torch.equal(trainer.model.embedding.tables[name].weight, before[name])
    assert not torch.equal(trainer.model.attention[0].weight, attention)  # the rest trained


def test_item_tables_can_start_from_the_retriever(trained: dict) -> None:
    trainer: TDMTrainer = trained["trainer"]
    retriever = load_bundle(trained["retriever"])
    embedding = FeatureEmbedding(trainer.encoder.groups, trainer.encoder.table_sizes())
    copied = copy_embeddings(retriever, trainer.encoder, embedding)
    assert copied == ["item_id", "category"]  # same name, kind and width in both; price is dense
    src_vocab = retriever.encoder.encodings["item_id"].tokens
    dst_vocab = trainer.encoder.encodings["item_id"].tokens
    for token in (dst_vocab[0], dst_vocab[17], dst_vocab[-1]):
        got = embedding.tables["item_id"].weight[dst_vocab.index(token) + 2]
        want = retriever.model.embedding.tables["item_id"].weight[src_vocab.index(token) + 2]
        assert torch.equal(got, want)
    assert torch.equal(embedding.tables["item_id"].weight[0], torch.zeros(16))  # padding stays zero


def test_bundle_round_trip_gives_identical_scores(trained: dict) -> None:
    trainer: TDMTrainer = trained["trainer"]
    bundle = load_bundle(trained["result"].bundle)
    assert isinstance(bundle.model, TDM)
    assert "history" in bundle.users.column_names and "popularity" in bundle.items.column_names
    enc = trainer.enc
    rows, users = np.arange(30), np.arange(30) % 7
    hist = enc.recent[users]
    trainer.model.eval()
    with torch.no_grad():
        ub = tdm_user_batch(trainer.model, enc, users, hist, torch.device("cpu"))
        ib = enc.item_batch(rows, torch.device("cpu"))
        want = trainer.model.score(ub, ib, torch.arange(30))
        got = bundle.model.score(ub, ib, torch.arange(30))
    assert torch.equal(want, got)
    # The serving path (ids, the bundle's own encodings and tables) gives the same numbers as the training path.
    ranker = Ranker(bundle)
    item_ids = [str(x) for x in enc.items["item_id"].to_pylist()[:30]]
    user_id = str(enc.users["user_id"][3])
    served = ranker.score(user_id, None, item_ids)
    with torch.no_grad():
        direct = trainer.model.score(
            tdm_user_batch(trainer.model, enc, np.array([3]), enc.recent[[3]], torch.device("cpu")), ib
        )
    np.testing.assert_allclose(served.scores, direct.numpy(), rtol=1e-5, atol=1e-5)


def test_score_of_a_candidate_does_not_depend_on_the_others(trained: dict) -> None:
    bundle = load_bundle(trained["result"].bundle)
    ranker = Ranker(bundle)
    ids = [str(x) for x in bundle.items["item_id"].to_pylist()]
    user = str(bundle.users["user_id"][5])
    alone = {i: float(ranker.score(user, None, [i]).scores[0]) for i in ids[:5]}
    many = ranker.score(user, None, list(reversed(ids[:5])) + ids[200:700])
    for i, s in zip(many.item_ids, many.scores, strict=True):
        if i in alone:
            assert s == pytest.approx(alone[i], abs=1e-5)
    shuffled = ranker.score(user, None, ids[600:700] + ids[:5])
    assert dict(zip(shuffled.item_ids, shuffled.scores.tolist(), strict=True))[ids[0]] == pytest.approx(
        alone[ids[0]], abs=1e-5
    )
    # The history matters: a different one changes the score.
    other = ranker.score(user, ids[10:20], ids[:5])
    assert not np.allclose(other.scores, [alone[i] for i in ids[:5]])


def test_unknown_candidates_are_reported_not_scored(trained: dict) -> None:
    bundle = load_bundle(trained["result"].bundle)
    ids = [str(x) for x in bundle.items["item_id"].to_pylist()]
    out = score(bundle, "no-such-user", [ids[3], "ghost-history"], ["ghost-1", ids[1], "ghost-2", ids[2]])
    assert out.unknown_ids == ["ghost-1", "ghost-2"]
    assert out.item_ids == [ids[1], ids[2]] and out.scores.shape == (2,) and np.isfinite(out.scores).all()
    none_known = score(bundle, {"region": "north"}, [], ["ghost"])
    assert none_known.item_ids == [] and none_known.unknown_ids == ["ghost"] and none_known.scores.shape == (0,)


def test_empty_or_too_many_candidates_are_rejected(trained: dict) -> None:
    ranker = Ranker(load_bundle(trained["result"].bundle))
    ids = [str(x) for x in ranker.bundle.items["item_id"].to_pylist()]
    with pytest.raises(QuiverError, match="candidates: empty"):
        ranker.score("u1", None, [])
    with pytest.raises(QuiverError, match=f"at most {MAX_CANDIDATES}"):
        ranker.score("u1", None, ids + ["x"] * (MAX_CANDIDATES + 1 - len(ids)))
    full = ranker.score("u1", None, (ids * 2)[:MAX_CANDIDATES])  # exactly the limit: one pass
    assert len(full.scores) == MAX_CANDIDATES


def test_eval_rerank_cli_writes_the_report(trained: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "report"
    argv = ["eval-rerank", "--retriever", str(trained["retriever"]), "--ranker", str(trained["result"].bundle)]
    assert main([*argv, "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    report = json.loads((out / "report.json").read_text())
    assert (out / "recall_at_k.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    before, after = report["retrieval"], report["reranked"]
    assert before["users"] == after["users"] > 700
    assert before["Recall@50"] == after["Recall@50"] == summary["Recall@50"]  # same candidates: same ceiling
    assert after["NDCG@10"] > before["NDCG@10"]  # TDM reorders the retriever's candidates for the better
    assert summary["relative_gain"]["NDCG@10"] == pytest.approx(after["NDCG@10"] / before["NDCG@10"] - 1)
    # A seeded sample of test users.
    assert main([*argv, "--out", str(tmp_path / "sample"), "--users", "100", "--k", "20"]) == 0
    capsys.readouterr()
    sample = json.loads((tmp_path / "sample" / "report.json").read_text())
    assert sample["users"] == 100 and sample["retrieve_k"] == 20 and "Recall@20" in sample
    # A ranker given as the retriever is one line, exit 2.
    assert (
        main(["eval-rerank", "--retriever", str(trained["result"].bundle), "--ranker", str(trained["result"].bundle)])
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "not a two-tower retriever" in err


def test_fit_cli_routes_tdm_configs(trained: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = dict(trained["cfg"])
    cfg["negatives"] = {"per_positive": 2, "retrieved_ratio": 0.0}
    cfg["train"] = {"epochs": 1, "batch_size": 512, "progress": False}
    cfg["output"] = {"root": str(tmp_path / "models"), "name": "cli_tdm"}
    path = tmp_path / "tdm.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["fit", "--config", str(path)]) == 0
    printed = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert json.loads((printed / "manifest.json").read_text())["model_type"] == "tdm"


def _config_error(tmp_path: Path, capsys: pytest.CaptureFixture[str], data: dict) -> str:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["fit", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(path) in err
    return err


def test_config_errors_are_one_line_with_dotted_paths(
    demo_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = tdm_config(demo_dir, tmp_path, None)
    parse_tdm_config(good, "ok")  # the base is valid
    bad = json.loads(json.dumps(good))
    bad["model"]["windows"] = [1, 2]
    assert "model.windows: Extra inputs are not permitted" in _config_error(tmp_path, capsys, bad)
    bad = json.loads(json.dumps(good))
    bad["model"]["windows_len"] = [1, 0]
    assert "model.windows_len" in _config_error(tmp_path, capsys, bad)
    bad = json.loads(json.dumps(good))
    bad["negatives"]["retrieved_ratio"] = 0.5  # no retriever named
    assert "negatives.retriever" in _config_error(tmp_path, capsys, bad)
    bad = json.loads(json.dumps(good))
    bad["negatives"]["positives"] = "retrieved"  # only a click-time list says which clicks were shown
    assert "negatives.retriever:" in _config_error(tmp_path, capsys, bad)
    bad["negatives"]["retriever"] = "artifacts/models/some_dssm"
    assert "negatives.positives: 'retrieved' needs negatives.retrieved_from: click" in _config_error(
        tmp_path, capsys, bad
    )
    bad = json.loads(json.dumps(good))
    bad["train"]["freeze_initialised"] = True
    assert "train.freeze_initialised: needs train.init_from_retriever" in _config_error(tmp_path, capsys, bad)
    bad = json.loads(json.dumps(good))
    bad["train"]["lr"] = "fast"
    assert "train.lr:" in _config_error(tmp_path, capsys, bad)
    bad = json.loads(json.dumps(good))
    bad["model"]["history"] = "hist"  # history = hist_item_id (16 dims); query 16 + 8 + 1 does not fit
    assert "features.item: the query (25 dims" in _config_error(tmp_path, capsys, bad)
    # A two-tower config never accepts type tdm's keys, and TDM's trainer refuses a two-tower model.
    two_tower = tiny_config(demo_dir, tmp_path)
    two_tower["model"] = {"type": "tdm", "windows_len": [1]}
    with pytest.raises(QuiverError) as err:
        parse_config(two_tower, "two-tower")
    assert "tdm" in str(err.value)
    with pytest.raises(QuiverError, match="model"):
        parse_tdm_config(good | {"model": {"type": "dssm"}}, "tdm")


def test_plain_eval_of_a_ranker_bundle_points_to_eval_rerank(trained: dict, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", "--bundle", str(trained["result"].bundle)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "eval-rerank" in err


def test_clicks_per_epoch_trains_on_the_subset_only(demo_dir: Path, tmp_path: Path) -> None:
    """A subset per epoch must not leave empty batches behind it (their mean loss was NaN)."""
    cfg = tdm_config(demo_dir, tmp_path / "models", None, epochs=1, clicks_per_epoch=300, batch_size=128)
    result = TDMTrainer(parse_tdm_config(cfg, "test")).fit()
    entry = result.metrics["history"][0]
    assert np.isfinite(entry["loss"])
    assert 300 <= entry["examples"] <= 300 * (1 + cfg["negatives"]["per_positive"])
