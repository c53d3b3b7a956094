"""`ssb_fast.metrics.evaluate` against the same definitions in plain numpy, one pair at a time.

8 scans x 256 samples x 4 experts at 128 x 128. The baseline is written the way the public peer code
computes these metrics (PHiSeg's GED double loops, CIMD-derived D_max / D_a / S_c / CI loops, CCDM's
lcm-repeated Hungarian IoU, DDI by its definition): each metric loops over its own pairs. It lives here,
not in the library. Prints the ratio; CUDA (when present) also reports scans/s.
    python -m pytest tests/benchmarks/test_evaluate_bench.py -m benchmark
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from ssb_fast.metrics import METRIC_NAMES, evaluate

SCANS, SAMPLES, EXPERTS, SIZE = 8, 256, 4, 128
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def lesion_masks(rng: np.random.Generator, count: int, centre: np.ndarray) -> np.ndarray:
    """Jittered ellipses around a lesion centre, some empty: masks shaped like plausible segmentations."""
    yy, xx = np.mgrid[:SIZE, :SIZE]
    masks = np.zeros((count, SIZE, SIZE), dtype=np.uint8)
    for i in range(count):
        if rng.random() < 0.05:
            continue
        cy, cx = centre + rng.normal(0, 3, 2)
        ry, rx = rng.uniform(6, 18, 2)
        masks[i] = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    return masks


def make_case(seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.uniform(40, 88, (SCANS, 2))
    samples = np.stack([lesion_masks(rng, SAMPLES, c) for c in centres])
    experts = np.stack([lesion_masks(rng, EXPERTS, c) for c in centres])
    return samples, experts


# ------------------------------------------------------------- the baseline: one pair at a time
def iou(a, b):
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else np.logical_and(a, b).sum() / union


def dice(a, b):
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else 2.0 * np.logical_and(a, b).sum() / total


def ged_pairwise(s, y):
    n, m = len(s), len(y)
    d_sy = sum(1 - iou(a, b) for a in s for b in y)
    d_ss = sum(1 - iou(a, b) for a in s for b in s)
    d_yy = sum(1 - iou(a, b) for a in y for b in y)
    return 2 / (n * m) * d_sy - d_ss / n**2 - d_yy / m**2


def d_max_pairwise(s, y):
    return float(np.mean([max(dice(a, b) for a in s) for b in y]))


def d_a_pairwise(s, y):
    v_y = [1 - dice(y[i], y[j]) for i in range(len(y)) for j in range(i + 1, len(y))] or [0.0]
    v_s = [1 - dice(s[i], s[j]) for i in range(len(s)) for j in range(i + 1, len(s))] or [0.0]
    return 1 - (abs(max(v_y) - max(v_s)) + abs(min(v_y) - min(v_s))) / 2


def s_c_pairwise(s, y):
    u_y, u_s = np.logical_or.reduce(y), np.logical_or.reduce(s)
    return 1.0 if u_y.sum() == 0 else np.logical_and(u_y, u_s).sum() / u_y.sum()


def hm_iou_pairwise(s, y):
    n, m = len(s), len(y)
    lcm = math.lcm(n, m)
    cost = np.array([[1 - iou(b, a) for a in s] for b in y])
    cost = np.repeat(np.repeat(cost, lcm // m, axis=0), lcm // n, axis=1)
    rows, cols = linear_sum_assignment(cost)
    return float((1 - cost[rows, cols]).mean())


def js(p, q):
    m = (p + q) / 2
    safe = np.where(m > 0, m, 1)
    kl_p = np.where(p > 0, p * np.log2(np.where(p > 0, p, 1) / safe), 0).sum()
    kl_q = np.where(q > 0, q * np.log2(np.where(q > 0, q, 1) / safe), 0).sum()
    return (kl_p + kl_q) / 2


def ddi_pairwise(s, y):
    d = np.array([[dice(b, a) for a in s] for b in y])

    def normalised(v):
        return v / v.sum() if v.sum() > 0 else np.full(len(v), 1 / len(v))

    rows = [normalised(d[i]) for i in range(len(y))]
    cols = [normalised(d[:, j]) for j in range(len(s))]
    ddi_e = np.mean([js(rows[i], rows[k]) for i in range(len(rows)) for k in range(len(rows)) if i != k])
    ddi_g = np.mean([js(cols[i], cols[k]) for i in range(len(cols)) for k in range(len(cols)) if i != k])
    return float(ddi_e), float(ddi_g)


def evaluate_pairwise(samples, experts) -> dict:
    out = {name: [] for name in METRIC_NAMES}
    for s, y in zip(samples.astype(bool), experts.astype(bool), strict=True):
        sc, dm, da = s_c_pairwise(s, y), d_max_pairwise(s, y), d_a_pairwise(s, y)
        ddi_e, ddi_g = ddi_pairwise(s, y)
        row = {"ged": ged_pairwise(s, y), "d_max": dm, "d_a": da, "s_c": sc,
               "ci": 3 * sc * dm * da / (sc + dm + da) if sc + dm + da else 0.0,
               "hm_iou": hm_iou_pairwise(s, y), "ddi_e": ddi_e, "ddi_g": ddi_g}
        for name in METRIC_NAMES:
            out[name].append(row[name])
    return out


@pytest.mark.parametrize("device", DEVICES)
def test_evaluate_against_pairwise_numpy(benchmark, device, capsys):
    samples, experts = make_case()
    if device == "cuda":
        s_dev, e_dev = torch.from_numpy(samples).cuda(), torch.from_numpy(experts).cuda()

        def run():
            result = evaluate(s_dev, e_dev)
            torch.cuda.synchronize()
            return result
    else:
        def run():
            return evaluate(samples, experts)

    fused = run()  # warm up (and compile kernels on CUDA) outside the timed rounds
    start = time.perf_counter()
    baseline = evaluate_pairwise(samples, experts)
    baseline_s = time.perf_counter() - start
    for name in METRIC_NAMES:  # the baseline computes the same numbers
        np.testing.assert_allclose(fused[name].numpy(), baseline[name], atol=1e-6, err_msg=name)

    benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)
    median = benchmark.stats.stats.median
    benchmark.extra_info.update(device=device, scans=SCANS, samples=SAMPLES, experts=EXPERTS, size=SIZE,
                                pairwise_numpy_s=baseline_s, speedup=baseline_s / median,
                                scans_per_s=SCANS / median)
    with capsys.disabled():
        print(f"\nevaluate on {device}: {median * 1e3:.0f} ms for {SCANS} scans x {SAMPLES} samples x "
              f"{EXPERTS} experts at {SIZE}x{SIZE} ({SCANS / median:.1f} scans/s); pairwise numpy "
              f"{baseline_s:.2f} s; ratio {baseline_s / median:.1f}x")
