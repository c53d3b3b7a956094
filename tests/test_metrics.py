"""`ssb_fast.metrics`: hand values, edge cases, properties, a one-pair-at-a-time cross-check, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from ssb_fast import metrics
from ssb_fast.metrics import d_a, d_max, ddi, evaluate, ged, hm_iou, s_c

KEYS = ("ged", "d_max", "d_a", "s_c", "ci", "hm_iou", "ddi_e", "ddi_g")


def grid(shape, *pixels):
    """A binary mask of `shape` with the listed (row, col) pixels set."""
    m = np.zeros(shape, dtype=np.uint8)
    for r, c in pixels:
        m[r, c] = 1
    return m


def log2(x):
    return math.log2(x)


def js(p, q):
    """Jensen–Shannon base 2 of two explicit distributions, 0 log 0 = 0."""
    total = 0.0
    for a, b in zip(p, q, strict=True):
        m = (a + b) / 2
        total += (a * log2(a / m) if a else 0.0) + (b * log2(b / m) if b else 0.0)
    return total / 2


# --------------------------------------------------------------- a one-pair-at-a-time cross-check
def peer_iou(a, b):
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else np.logical_and(a, b).sum() / union  # IoU(∅, ∅) = 1 (PHiSeg, CCDM)


def peer_dice(a, b):
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else 2.0 * np.logical_and(a, b).sum() / total


def peer_metrics(samples, experts):
    """The definitions computed pair by pair, the way the public peer code loops (PHiSeg's GED,
    CCDM's lcm-repeated Hungarian IoU, CIMD-derived D_max / S_c / CI), with this project's D_a and DDI."""
    s = [x.astype(bool) for x in samples]
    y = [x.astype(bool) for x in experts]
    n, m = len(s), len(y)
    d_sy = [1 - peer_iou(a, b) for a in s for b in y]
    d_ss = [1 - peer_iou(a, b) for a in s for b in s]
    d_yy = [1 - peer_iou(a, b) for a in y for b in y]
    out = {"ged": 2 / (n * m) * sum(d_sy) - sum(d_ss) / n**2 - sum(d_yy) / m**2}
    out["d_max"] = float(np.mean([max(peer_dice(a, b) for a in s) for b in y]))
    v_y = [1 - peer_dice(y[i], y[j]) for i in range(m) for j in range(i + 1, m)] or [0.0]
    v_s = [1 - peer_dice(s[i], s[j]) for i in range(n) for j in range(i + 1, n)] or [0.0]
    out["d_a"] = 1 - (abs(max(v_y) - max(v_s)) + abs(min(v_y) - min(v_s))) / 2
    u_y, u_s = np.logical_or.reduce(y), np.logical_or.reduce(s)
    out["s_c"] = 1.0 if u_y.sum() == 0 else np.logical_and(u_y, u_s).sum() / u_y.sum()
    den = out["s_c"] + out["d_max"] + out["d_a"]
    out["ci"] = 3 * out["s_c"] * out["d_max"] * out["d_a"] / den if den else 0.0
    lcm = math.lcm(n, m)
    cost = np.array([[1 - peer_iou(b, a) for a in s] for b in y])
    cost = np.repeat(np.repeat(cost, lcm // m, axis=0), lcm // n, axis=1)
    rows, cols = linear_sum_assignment(cost)
    out["hm_iou"] = float((1 - cost[rows, cols]).mean())
    dice = np.array([[peer_dice(b, a) for a in s] for b in y])

    def normalised(v):
        return v / v.sum() if v.sum() > 0 else np.full(len(v), 1 / len(v))

    p_rows = [normalised(dice[i]) for i in range(m)]
    q_cols = [normalised(dice[:, j]) for j in range(n)]
    def mean_js(dists):
        pairs = [js(a, b) for i, a in enumerate(dists) for k, b in enumerate(dists) if i != k]
        return float(np.mean(pairs)) if pairs else 0.0

    out["ddi_e"], out["ddi_g"] = mean_js(p_rows), mean_js(q_cols)
    return out


def random_case(rng, n, m, size=(5, 6)):
    density = rng.uniform(0.05, 0.6)
    samples = rng.random((n, *size)) < density
    experts = rng.random((m, *size)) < rng.uniform(0.05, 0.6)
    if rng.random() < 0.3:
        samples[rng.integers(n)] = False  # an empty sample now and then
    if rng.random() < 0.3:
        experts[rng.integers(m)] = False
    return samples, experts


def assert_metrics(got: dict, want: dict, tol=1e-9, ddi_tol=1e-6):
    for key, value in want.items():
        t = ddi_tol if key.startswith("ddi") else tol
        assert got[key] == pytest.approx(value, abs=t), f"{key}: got {got[key]}, want {value}"


def test_agrees_with_pair_by_pair_definitions_on_random_cases():
    rng = np.random.default_rng(0)
    for _ in range(40):
        n, m = int(rng.integers(1, 9)), int(rng.integers(1, 5))
        samples, experts = random_case(rng, n, m)
        assert_metrics(evaluate(samples, experts), peer_metrics(samples, experts))


def test_batch_with_missing_experts_equals_each_scan_alone():
    rng = np.random.default_rng(1)
    batch, n, m = 5, 6, 4
    samples = rng.random((batch, n, 7, 5)) < 0.4
    experts = rng.random((batch, m, 7, 5)) < 0.4
    present = rng.random((batch, m)) < 0.6
    present[:, 1] = True
    experts_with_junk = experts.copy()
    result = evaluate(torch.from_numpy(samples), experts_with_junk, torch.from_numpy(present))
    for key in KEYS:
        assert isinstance(result[key], torch.Tensor) and result[key].shape == (batch,)
    assert result["n_experts"].tolist() == present.sum(1).tolist()
    assert result["n_samples"].tolist() == [n] * batch
    for b in range(batch):
        want = peer_metrics(samples[b], experts[b][present[b]])
        assert_metrics({k: float(result[k][b]) for k in KEYS}, want)


# ------------------------------------------------------------------------------ hand-computed
def test_hand_computed_3x3():
    # Samples: top row, left column. Experts: top row, the corner pixel (0, 0).
    top = grid((3, 3), (0, 0), (0, 1), (0, 2))
    left = grid((3, 3), (0, 0), (1, 0), (2, 0))
    corner = grid((3, 3), (0, 0))
    samples, experts = np.stack([top, left]), np.stack([top, corner])
    # IoU: top/left 1/5, top/corner 1/3, left/corner 1/3; Dice: top/left 1/3, x/corner 1/2.
    # cross d = (0 + 2/3 + 4/5 + 2/3)/4 = 8/15; within samples (0 + 4/5 + 4/5 + 0)/4; experts (2/3 + 2/3)/4.
    assert ged(samples, experts) == pytest.approx(2 * 8 / 15 - 2 / 5 - 1 / 3, abs=1e-12)
    assert d_max(samples, experts) == pytest.approx((1 + 1 / 2) / 2, abs=1e-12)
    assert d_a(samples, experts) == pytest.approx(1 - (1 / 6 + 1 / 6) / 2, abs=1e-12)
    assert s_c(samples, experts) == 1.0  # both experts lie inside the top row, which a sample covers
    ci = 3 * 1 * (3 / 4) * (5 / 6) / (1 + 3 / 4 + 5 / 6)
    assert metrics.ci_score(samples, experts) == pytest.approx(ci, abs=1e-12)
    assert hm_iou(samples, experts) == pytest.approx((1 + 1 / 3) / 2, abs=1e-12)
    # Dice experts x samples [[1, 1/3], [1/2, 1/2]]: rows [3/4, 1/4], [1/2, 1/2];
    # columns [2/3, 1/3], [2/5, 3/5].
    ddi_e, ddi_g = ddi(samples, experts)
    assert ddi_e == pytest.approx(js([3 / 4, 1 / 4], [1 / 2, 1 / 2]), abs=1e-7)
    assert ddi_g == pytest.approx(js([2 / 3, 1 / 3], [2 / 5, 3 / 5]), abs=1e-7)
    assert ddi_e == pytest.approx(0.5 * (3 / 4 * log2(6 / 5) + 1 / 4 * log2(2 / 3)
                                         + 1 / 2 * log2(4 / 5) + 1 / 2 * log2(4 / 3)), abs=1e-7)


def test_hand_computed_4x4_with_an_empty_expert_and_a_missing_one():
    block = grid((4, 4), (0, 0), (0, 1), (1, 0), (1, 1))
    row = grid((4, 4), (0, 0), (0, 1), (0, 2), (0, 3))
    empty = np.zeros((4, 4), np.uint8)
    full = np.ones((4, 4), np.uint8)  # an annotator who did not annotate this scan: must not count
    samples = np.stack([block, empty, row])
    experts = np.stack([block, empty, full])
    present = np.array([True, True, False])
    got = evaluate(samples, experts, present)
    # d: block/empty 1, block/row 2/3, empty/row 1. cross 11/18, within samples 16/27, experts 1/2.
    want = {
        "ged": 7 / 54,
        "d_max": 1.0,              # block matches block, the empty expert an empty sample (Dice(∅,∅) = 1)
        "d_a": 3 / 4,              # V_Y = {1}; V_S = {1, 1/2, 1}
        "s_c": 1.0,
        "ci": 9 / 11,
        "hm_iou": 13 / 18,         # lcm 6: block->block x2, block->row, empty->empty x2, empty->row
        "ddi_e": 1.0,              # expert rows [2/3, 0, 1/3] and [0, 1, 0]: disjoint supports
        "ddi_g": 2 / 3,            # sample columns [1, 0], [0, 1], [1, 0]
    }
    assert_metrics(got, want, tol=1e-12)
    assert got["n_samples"] == 3 and got["n_experts"] == 2
    assert isinstance(got["ged"], float) and isinstance(got["n_experts"], int)


# --------------------------------------------------------------------------------- edge cases
def test_all_masks_empty():
    got = evaluate(np.zeros((3, 4, 4)), np.zeros((2, 4, 4)))
    assert_metrics(got, {"ged": 0.0, "d_max": 1.0, "d_a": 1.0, "s_c": 1.0, "ci": 1.0, "hm_iou": 1.0,
                         "ddi_e": 0.0, "ddi_g": 0.0}, tol=0)


def test_experts_empty_samples_not():
    blob = grid((3, 3), (1, 1), (1, 2))
    got = evaluate(np.stack([blob, blob]), np.zeros((2, 3, 3)))
    assert_metrics(got, {"ged": 2.0, "d_max": 0.0, "d_a": 1.0, "s_c": 1.0, "ci": 0.0, "hm_iou": 0.0,
                         "ddi_e": 0.0, "ddi_g": 0.0}, tol=0)


def test_samples_empty_experts_not():
    blob = grid((3, 3), (0, 1), (1, 1))
    got = evaluate(np.zeros((2, 3, 3)), np.stack([blob, blob]))
    assert_metrics(got, {"ged": 2.0, "d_max": 0.0, "d_a": 1.0, "s_c": 0.0, "ci": 0.0, "hm_iou": 0.0,
                         "ddi_e": 0.0, "ddi_g": 0.0}, tol=0)


def test_one_expert_empty_among_four():
    a = grid((4, 4), (1, 1), (1, 2), (2, 1))
    empty = np.zeros((4, 4), np.uint8)
    experts = np.stack([a, a, a, empty])
    # The same multiset of samples: every term agrees. The empty row of the Dice matrix is disjoint
    # from the others, so 6 of the 12 ordered pairs have JS 1 on each side.
    got = evaluate(np.stack([a, empty, a, a]), experts)
    assert_metrics(got, {"ged": 0.0, "d_max": 1.0, "d_a": 1.0, "s_c": 1.0, "ci": 1.0, "hm_iou": 1.0,
                         "ddi_e": 0.5, "ddi_g": 0.5}, tol=1e-12)
    # Without an empty sample the empty expert's best Dice is 0.
    got = evaluate(np.stack([a, a, a]), experts)
    assert got["d_max"] == pytest.approx(3 / 4, abs=1e-12)
    assert got["s_c"] == 1.0


def test_identical_sets():
    rng = np.random.default_rng(3)
    masks = rng.random((4, 6, 6)) < 0.5
    got = evaluate(masks, masks.copy())
    want = {"ged": 0.0, "d_max": 1.0, "d_a": 1.0, "s_c": 1.0, "ci": 1.0, "hm_iou": 1.0}
    assert_metrics(got, want, tol=1e-12)


def test_disjoint_sets():
    s1, s2 = grid((4, 4), (0, 0)), grid((4, 4), (1, 0), (1, 1))
    y1, y2 = grid((4, 4), (3, 3)), grid((4, 4), (2, 2), (2, 3))
    got = evaluate(np.stack([s1, s2]), np.stack([y1, y2]))
    # Every distinct pair is disjoint (d = 1): 2·1 − 2/4 − 2/4.
    assert_metrics(got, {"ged": 1.0, "d_max": 0.0, "d_a": 1.0, "s_c": 0.0, "ci": 0.0, "hm_iou": 0.0,
                         "ddi_e": 0.0, "ddi_g": 0.0}, tol=0)


def test_single_pixel_masks():
    got = evaluate(np.stack([grid((3, 3), (0, 0)), grid((3, 3), (1, 1))]), grid((3, 3), (0, 0))[None])
    # cross (0 + 1)/2, within samples 2/4, within experts 0; one expert has V = 0, the samples V = 1.
    assert_metrics(got, {"ged": 0.5, "d_max": 1.0, "d_a": 0.0, "s_c": 1.0, "ci": 0.0, "hm_iou": 0.5,
                         "ddi_e": 0.0, "ddi_g": 0.0}, tol=1e-12)


def test_all_ones_masks():
    got = evaluate(np.ones((5, 3, 4), np.float32), np.ones((3, 3, 4), bool))
    assert_metrics(got, {"ged": 0.0, "d_max": 1.0, "d_a": 1.0, "s_c": 1.0, "ci": 1.0, "hm_iou": 1.0,
                         "ddi_e": 0.0, "ddi_g": 0.0}, tol=0)


# --------------------------------------------------------------------------------- properties
def test_ged_non_negative_and_ddi_in_unit_interval():
    rng = np.random.default_rng(4)
    samples = rng.random((6, 12, 8, 8)) < rng.uniform(0.05, 0.7, (6, 1, 1, 1))
    experts = rng.random((6, 4, 8, 8)) < rng.uniform(0.05, 0.7, (6, 1, 1, 1))
    got = evaluate(samples, experts)
    assert (got["ged"] >= -1e-12).all()
    for key in ("ddi_e", "ddi_g", "d_max", "d_a", "s_c", "ci", "hm_iou"):
        assert ((got[key] >= 0) & (got[key] <= 1)).all(), key


def test_permuting_samples_or_experts_changes_nothing():
    rng = np.random.default_rng(5)
    samples, experts = random_case(rng, 7, 4)
    base = evaluate(samples, experts)
    permuted = evaluate(samples[rng.permutation(7)], experts[rng.permutation(4)])
    assert_metrics(permuted, base, tol=1e-12, ddi_tol=1e-9)


def test_input_types_give_the_same_result():
    rng = np.random.default_rng(6)
    samples, experts = random_case(rng, 5, 3)
    base = evaluate(samples, experts)
    for s, e in [(samples.astype(np.uint8), experts.astype(np.float32)),
                 (torch.from_numpy(samples), torch.from_numpy(experts).to(torch.bfloat16)),
                 (torch.from_numpy(samples).to(torch.int64), experts.astype(np.float64))]:
        assert_metrics(evaluate(s, e), base, tol=0, ddi_tol=0)


def test_single_functions_match_evaluate():
    rng = np.random.default_rng(7)
    samples = rng.random((3, 5, 6, 6)) < 0.4
    experts = rng.random((3, 3, 6, 6)) < 0.4
    got = evaluate(samples, experts)
    for name, fn in [("ged", ged), ("d_max", d_max), ("d_a", d_a), ("s_c", s_c), ("ci", metrics.ci_score),
                     ("hm_iou", hm_iou)]:
        assert torch.equal(fn(samples, experts), got[name]), name
    ddi_e, ddi_g = ddi(samples, experts)
    assert torch.equal(ddi_e, got["ddi_e"]) and torch.equal(ddi_g, got["ddi_g"])


def test_d_a_pixel_variance_matches_numpy_var_of_differences():
    rng = np.random.default_rng(8)
    samples, experts = random_case(rng, 5, 3)

    def spread(masks):
        v = [np.var(masks[i].astype(int) - masks[j].astype(int))
             for i in range(len(masks)) for j in range(i + 1, len(masks))]
        return max(v), min(v)

    (sy_max, sy_min), (ss_max, ss_min) = spread(experts), spread(samples)
    want = 1 - (abs(sy_max - ss_max) + abs(sy_min - ss_min)) / 2
    assert d_a(samples, experts, pair_distance="pixel_variance") == pytest.approx(want, abs=1e-12)
    with pytest.raises(ValueError, match="pair_distance must be one of dice, pixel_variance"):
        d_a(samples, experts, pair_distance="l2")


def test_empty_batch():
    got = evaluate(np.zeros((0, 3, 4, 4)), np.zeros((0, 2, 4, 4)))
    assert all(got[k].shape == (0,) for k in KEYS)


def test_ddi_uniform_fallback_spans_present_experts_only():
    a, b, c = grid((3, 3), (0, 0)), grid((3, 3), (2, 2)), grid((3, 3), (1, 1))
    junk = np.ones((3, 3), np.uint8)
    # Sample c overlaps no present expert: its column falls back to uniform over the two present ones.
    ddi_e, ddi_g = ddi(np.stack([a, c]), np.stack([a, b, junk]), np.array([True, True, False]))
    q_a, q_c = [1.0, 0.0], [0.5, 0.5]
    assert ddi_g == pytest.approx(js(q_a, q_c), abs=1e-7)
    assert ddi_e == pytest.approx(js([1.0, 0.0], [0.5, 0.5]), abs=1e-7)  # expert b's row is all zero too


def test_hm_iou_repeats_to_the_lcm():
    # N = 3 samples, M = 2 experts: lcm 6; the expert 'a' can cover only two of the three a-samples.
    a, b = grid((2, 2), (0, 0)), grid((2, 2), (1, 1))
    got = hm_iou(np.stack([a, a, a]), np.stack([a, b]))
    # Expert a x3 -> a-samples (3 of 6 copies); expert b x3 -> a-samples (IoU 0): mean 3/6.
    assert got == pytest.approx(0.5, abs=1e-12)


# ---------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("samples, experts, present, error, match", [
    (np.full((2, 3, 3), 2, np.uint8), np.zeros((1, 3, 3)), None, ValueError,
     r"samples must be binary masks \(0/1\); found value 2 at index \(0, 0, 0, 0\)"),
    (np.zeros((2, 3, 3)), np.full((1, 3, 3), 0.5), None, ValueError, r"experts must be binary.*0\.5"),
    (np.zeros((2, 3, 3)), -np.ones((1, 3, 3), np.int64), None, ValueError, "experts must be binary.*-1"),
    (np.array([[[0, float("nan")]]]), np.zeros((1, 1, 2)), None, ValueError, r"samples must be binary.*nan"),
    (np.array([[[0, float("inf")]]]), np.zeros((1, 1, 2)), None, ValueError, r"samples must be binary.*inf"),
    (np.zeros((2, 3, 3)), np.zeros((1, 3, 4)), None, ValueError, r"same H x W; got \(3, 3\) and \(3, 4\)"),
    (np.zeros((2, 2, 3, 3)), np.zeros((3, 1, 3, 3)), None, ValueError, "same scans; got B = 2"),
    (np.zeros((2, 3, 3)), np.zeros((1, 1, 3, 3)), None, ValueError, r"experts must be \(M, H, W\)"),
    (np.zeros((3, 3)), np.zeros((3, 3)), None, ValueError,
     r"samples must be \(N, H, W\).*got shape \(3, 3\)"),
    (np.zeros((0, 3, 3)), np.zeros((1, 3, 3)), None, ValueError, r"samples holds no masks \(N = 0"),
    (np.zeros((2, 3, 3)), np.zeros((0, 3, 3)), None, ValueError, r"experts holds no masks \(M = 0"),
    (np.zeros((2, 3, 3)), np.zeros((2, 3, 3)), np.array([False, False]), ValueError, "has no present expert"),
    (np.zeros((2, 2, 3, 3)), np.zeros((2, 2, 3, 3)), np.array([[True, False], [False, False]]), ValueError,
     "scan 1 has no present expert"),
    (np.zeros((2, 3, 3)), np.zeros((2, 3, 3)), np.array([True, True, True]), ValueError,
     r"present must have shape \(2,\)"),
    (np.zeros((2, 3, 3)), np.zeros((2, 3, 3)), np.array([1, 2]), ValueError, "present must be bool or 0/1"),
    (np.array([["a"]]), np.zeros((1, 1, 1)), None, TypeError, "samples must hold bool, integer or float"),
    (torch.zeros(1, 2, 2, dtype=torch.complex64), np.zeros((1, 2, 2)), None, TypeError, "samples must hold"),
])
def test_bad_input_is_named(samples, experts, present, error, match):
    with pytest.raises(error, match=match):
        evaluate(samples, experts, present)
