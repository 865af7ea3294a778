"""Negative sampling (DESIGN §5): exclusion of the batch's positives, popularity^alpha frequencies, log-Q."""

import re

import numpy as np
import pytest
import torch

from models.errors import QuiverError
from training.sampler import NegativeSampler, log_q_correction


def _counts(sampler: NegativeSampler, positives: np.ndarray, calls: int, n_items: int) -> np.ndarray:
    counts = np.zeros(n_items, dtype=np.int64)
    for _ in range(calls):
        neg, _ = sampler.sample(positives)
        counts += np.bincount(neg, minlength=n_items)
    return counts


def test_never_returns_a_batch_positive_and_returns_exactly_n() -> None:
    popularity = np.array([50.0, 1, 1, 40, 1, 1, 1, 30, 1, 1])  # the positives are the most popular items
    sampler = NegativeSampler(popularity, num=6, alpha=1.0, seed=3)
    rng = np.random.default_rng(0)
    seen = np.zeros(10, dtype=bool)
    for _ in range(500):
        positives = rng.choice(10, size=4)  # with repeats
        neg, log_q = sampler.sample(positives)
        assert neg.shape == (6,) and log_q.shape == (6,)
        assert log_q.dtype == np.float32 and np.issubdtype(neg.dtype, np.integer)
        assert not np.isin(neg, positives).any()
        assert neg.min() >= 0 and neg.max() < 10
        seen[neg] = True
    assert seen.all()  # every item is sometimes a negative


def test_frequencies_follow_popularity_to_the_alpha() -> None:
    n = 50
    popularity = np.arange(1, n + 1, dtype=np.float64) ** 2  # alpha 0.5 -> weight i + 1 for item i
    positives = np.array([0, 10, 49, 10])
    sampler = NegativeSampler(popularity, num=40, alpha=0.5, seed=11)
    calls = 5000  # 200k draws
    counts = _counts(sampler, positives, calls, n)
    weights = np.arange(1, n + 1, dtype=np.float64)
    weights[[0, 10, 49]] = 0.0
    expected = calls * 40 * weights / weights.sum()  # renormalised over the non-positives
    assert counts[[0, 10, 49]].sum() == 0
    keep = expected > 0
    chi2 = float((((counts - expected) ** 2)[keep] / expected[keep]).sum())
    assert chi2 < 100  # 46 degrees of freedom: mean 46, sd ~9.6
    large = expected > 3000
    assert large.sum() > 20
    rel = np.abs(counts[large] - expected[large]) / expected[large]
    assert rel.max() < 0.1


def test_alpha_zero_is_uniform_over_the_non_excluded_items() -> None:
    popularity = np.array([1000.0, 1, 0, 7, 500, 3, 1, 1, 90, 2, 0, 40])
    sampler = NegativeSampler(popularity, num=8, alpha=0.0, seed=5)
    positives = np.array([0, 4])
    counts = _counts(sampler, positives, 5000, 12)  # 40k draws over 10 items: 4000 each
    assert counts[[0, 4]].sum() == 0
    others = np.delete(counts, [0, 4])
    assert np.abs(others - 4000).max() / 4000 < 0.1
    chi2 = float(((others - 4000) ** 2 / 4000).sum())
    assert chi2 < 40  # 9 degrees of freedom


def test_log_q_is_log_of_n_times_the_renormalised_probability() -> None:
    # weights: max(pop, 1)^0.75 = 16^.75, max(0,1)^.75, 81^.75, 1^.75 = 8, 1, 27, 1
    # positive item 2 removed: 8 + 1 + 1 = 10 -> q = 0.8, 0.1, -, 0.1; log_q = log(3 q) = log 2.4 / log 0.3
    sampler = NegativeSampler(np.array([16.0, 0.0, 81.0, 1.0]), num=3, alpha=0.75, seed=0)
    expected = {0: np.log(2.4), 1: np.log(0.3), 3: np.log(0.3)}
    counts = np.zeros(4)
    for _ in range(4000):
        neg, log_q = sampler.sample(np.array([2, 2]))
        np.testing.assert_allclose(log_q, [expected[int(i)] for i in neg], rtol=1e-6)
        counts += np.bincount(neg, minlength=4)
    # 12000 draws at q = 0.8 / 0.1 / 0.1
    np.testing.assert_allclose(counts / counts.sum(), [0.8, 0.1, 0.0, 0.1], atol=0.015)


def test_same_seed_same_draws() -> None:
    popularity = np.arange(1.0, 31.0)
    a = NegativeSampler(popularity, num=10, alpha=0.75, seed=7)
    b = NegativeSampler(popularity, num=10, alpha=0.75, seed=7)
    c = NegativeSampler(popularity, num=10, alpha=0.75, seed=8)
    pos = np.array([1, 2, 3])
    draws_a = [a.sample(pos)[0] for _ in range(5)]
    draws_b = [b.sample(pos)[0] for _ in range(5)]
    draws_c = [c.sample(pos)[0] for _ in range(5)]
    assert all(np.array_equal(x, y) for x, y in zip(draws_a, draws_b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(draws_a, draws_c, strict=True))


def test_log_q_correction_touches_only_the_sampled_columns() -> None:
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])  # [pos | 3 neg | 2 hard]
    log_q = torch.tensor([0.5, -1.0, 2.0])
    out = log_q_correction(logits, log_q)
    # columns 1..3 minus (0.5, -1, 2); column 0 (positive) and 4..5 (hard) unchanged
    assert torch.equal(out, torch.tensor([[1.0, 1.5, 4.0, 2.0, 5.0, 6.0], [0.0, -0.5, 1.0, -2.0, 0.0, 0.0]]))
    assert torch.equal(logits[0], torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]))  # not modified in place


def test_log_q_correction_gradient_passes_through_unchanged() -> None:
    logits = torch.zeros(2, 4, dtype=torch.float64, requires_grad=True)
    log_q_correction(logits, torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert torch.equal(logits.grad, torch.ones(2, 4, dtype=torch.float64))


def test_num_at_least_the_catalog_size_is_rejected() -> None:
    with pytest.raises((ValueError, QuiverError), match=re.escape("negatives.num: 5")):
        NegativeSampler(np.ones(5), num=5, alpha=0.75, seed=0)
    with pytest.raises((ValueError, QuiverError), match=re.escape("negatives.num: 9")):
        NegativeSampler(np.ones(5), num=9, alpha=0.75, seed=0)
    assert len(NegativeSampler(np.ones(5), num=4, alpha=0.75, seed=0).sample(np.array([0]))[0]) == 4


def test_a_batch_covering_the_whole_catalog_is_an_error() -> None:
    sampler = NegativeSampler(np.ones(4), num=2, alpha=0.0, seed=0)
    with pytest.raises((ValueError, QuiverError), match="every sampleable item"):
        sampler.sample(np.array([0, 1, 2, 3]))
    # with one item left, every negative is that item
    neg, log_q = sampler.sample(np.array([0, 1, 3]))
    assert neg.tolist() == [2, 2]
    np.testing.assert_allclose(log_q, np.log([2.0, 2.0]))  # q = 1, N = 2
