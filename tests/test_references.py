"""Reference mask sets and the statistics that say what a sampler's scores mean."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ssb_fast.metrics import ged
from ssb_fast.references import (
    bootstrap_ratio,
    consensus,
    empty_rate,
    empty_rate_by_label,
    empty_rate_by_marked,
    majority_vote,
    mean_se,
    mixed_share_by_label,
    no_diversity,
    nonempty_ged,
    reader_draws,
    reader_empty_rate,
    reader_empty_rate_by_rank,
    spread_cases,
)


def test_spread_cases_cover_the_split_evenly_not_its_start():
    assert spread_cases(361, 5) == [0, 90, 180, 270, 360]
    assert spread_cases(4, 10) == [0, 1, 2, 3] and spread_cases(7, None) == list(range(7))
    picks = spread_cases(1000, 64)
    assert len(picks) == 64 and picks[-1] == 999 and max(np.diff(picks)) <= 17
    with pytest.raises(ValueError):
        spread_cases(10, 0)


def test_majority_vote_counts_present_readers_and_ties_mark():
    m = torch.zeros(1, 4, 1, 4, dtype=torch.uint8)
    m[0, 0, 0, :3] = 1  # pixel 0: 3 readers, pixel 1: 2, pixel 2: 1
    m[0, 1, 0, :2] = 1
    m[0, 2, 0, :1] = 1
    assert majority_vote(m).tolist() == [[[1, 1, 0, 0]]]
    present = torch.tensor([[True, True, True, False]])  # 3 readers: pixel 1 has 2 of 3
    m[0, 3] = 1  # an absent reader's mask never counts
    assert majority_vote(m, present).tolist() == [[[1, 1, 0, 0]]]
    assert majority_vote(torch.zeros(1, 2, 2, 2)).sum() == 0


def test_reference_sets():
    experts = torch.zeros(2, 4, 8, 8, dtype=torch.uint8)
    experts[0, :2, 2:5, 2:5] = 1
    experts[1, 0, 1:3, 1:3] = 1
    present = torch.tensor([[True] * 4, [True, True, False, False]])
    flat = no_diversity(experts, present, 16)
    assert flat.shape == (2, 16, 8, 8) and torch.equal(flat[0, 3], majority_vote(experts, present)[0])
    # no diversity scores exactly the GED of the majority against the readers
    assert ged(flat[0], experts[0]) == pytest.approx(ged(flat[0, :1], experts[0]))
    draws = reader_draws(experts, present, 100, seed=1, case_ids=["a", "b"])
    assert draws.shape == (2, 100, 8, 8)
    assert set(draws[1].reshape(100, -1).sum(1).tolist()) <= {4, 0}  # only the two present readers
    assert torch.equal(draws[1], reader_draws(experts[1:], present[1:], 100, seed=1, case_ids=["b"])[0])
    assert 0.3 < empty_rate(draws[0]) < 0.7  # half the readers of case 0 are empty
    assert reader_empty_rate(experts, present) == pytest.approx(3 / 6)
    assert torch.equal(consensus(draws[:1], 3)[0, 0], majority_vote(draws[:1])[0])


def test_empty_rates_by_label_by_rank_and_by_readers_who_marked():
    experts = torch.zeros(3, 4, 4, 4, dtype=torch.uint8)
    experts[0, 1, :2] = 1          # case 0: one reader marked
    experts[1, :, :1] = 1          # case 1: all four marked
    experts[1, 2, :3] = 1
    experts[2, 0, 0, 0] = 1        # case 2: two of three present readers marked (slot 3 absent, marked)
    experts[2, 2, :2] = 1
    experts[2, 3] = 1
    present = torch.tensor([[True] * 4, [True] * 4, [True, True, True, False]])
    # rank 0 is never empty; rank 1 is empty in case 0 only; rank 2 in cases 0 and 2; rank 3 (two cases
    # have a fourth reader) in case 0 only
    assert reader_empty_rate_by_rank(experts, present) == pytest.approx([0.0, 1 / 3, 2 / 3, 1 / 2])
    samples = torch.zeros(3, 4, 4, 4, dtype=torch.uint8)
    samples[:, 0] = 1                # label 0 always marks
    samples[1, 1] = 1                # label 1 marks on case 1 only
    labels = torch.tensor([[0, 1, 2, 2]] * 3)
    rates = empty_rate_by_label(samples, labels, 4)
    assert rates[:3] == pytest.approx([0.0, 2 / 3, 1.0]) and rates[3] is None  # no mask drew label 3
    # label 2 has two masks per case: none disagree, until case 2's first label-2 mask marks
    assert mixed_share_by_label(samples, labels, 4) == [None, None, 0.0, None]
    one_marks = samples.clone()
    one_marks[2, 2, 1, 1] = 1
    assert mixed_share_by_label(one_marks, labels, 4)[2] == pytest.approx(1 / 3)
    by_marked = empty_rate_by_marked(samples, experts, present)
    assert list(by_marked) == [1, 2, 4]
    assert by_marked[1] == {"cases": 1, "samples": 0.75, "readers": 0.75}
    assert by_marked[2] == {"cases": 1, "samples": 0.75, "readers": pytest.approx(1 / 3)}
    assert by_marked[4] == {"cases": 1, "samples": 0.5, "readers": 0.0}


def test_nonempty_ged_scores_the_marked_samples_alone_and_is_nan_when_none_mark():
    experts = torch.zeros(2, 2, 4, 4, dtype=torch.uint8)
    experts[:, :, :2, :2] = 1                      # both readers draw the same square in both cases
    present = torch.ones(2, 2, dtype=torch.bool)
    samples = torch.zeros(2, 4, 4, 4, dtype=torch.uint8)
    samples[0, :2, :2, :2] = 1                     # case 0: two exact masks, two empty ones; case 1: all empty
    shapes = nonempty_ged(samples, experts, present)
    assert shapes[0] == pytest.approx(0.0) and np.isnan(shapes[1])
    # the empty samples are what the whole set's GED pays: 2·(1/2)·1 − 2·(1/2)(1/2)·1 = 1/2
    assert float(ged(samples[0], experts[0], present[0])) == pytest.approx(0.5)
    samples[1, 0, 1:3, 1:3] = 1                    # case 1: one shifted square, IoU 1/7 with the readers'
    assert nonempty_ged(samples, experts, present)[1] == pytest.approx(2 * (1 - 1 / 7))


def test_mean_se_and_bootstrap_ratio():
    mean, se = mean_se([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5 and se == pytest.approx(np.std([1, 2, 3, 4], ddof=1) / 2)
    assert np.isnan(mean_se([5.0])[1])
    a, b = np.array([0.1, 0.2, 0.3, 0.4]), np.array([0.2, 0.4, 0.6, 0.8])
    ratio, low, high = bootstrap_ratio(a, b)
    assert ratio == pytest.approx(0.5) and low == pytest.approx(0.5) and high == pytest.approx(0.5)
    rng = np.random.default_rng(0)
    b = rng.uniform(0.1, 0.5, 200)
    a = b * rng.uniform(0.4, 1.0, 200)
    ratio, low, high = bootstrap_ratio(a, b)
    assert low < ratio < high and 0.6 < ratio < 0.8
    with pytest.raises(ValueError):
        bootstrap_ratio([1.0], [1.0, 2.0])
