"""Property-based tests (hypothesis, derandomized so CI is stable): random shapes with sizes down to 0 and 1,
non-contiguous views and extreme values.

- every kernel's Triton launcher against its PyTorch reference (under the interpreter on CPU: few examples);
- every metric against its defining formula, written plainly here, pair by pair in Python;
- the bridge's schedules and coefficients stay finite, and positive where they must be, for any valid
  schedule (and an invalid one is refused with ValueError).

`-m slow` runs the same properties with many more examples.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from _helpers import assert_close_report
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from ssb_fast.kernels import noise_seeds
from ssb_fast.kernels.bridge_sample import bridge_sample_ref, bridge_sample_triton
from ssb_fast.kernels.cfg_step import cfg_step_ref, cfg_step_triton
from ssb_fast.kernels.pair_counts import pair_counts_ref, pair_counts_triton
from ssb_fast.kernels.pairwise_jsd import pairwise_jsd_ref, pairwise_jsd_triton

from ssb_fast.bridge import Bridge
from ssb_fast.metrics import evaluate

COMMON = dict(deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                     HealthCheck.function_scoped_fixture])  # triton_device is a constant


def budget(examples: int):
    """A property's settings: `examples` random cases, the same ones on every run."""
    return settings(max_examples=examples, **COMMON)


def strided(x: torch.Tensor, how: int) -> torch.Tensor:
    """The same values as `x` in another layout: 0 as is, 1 a stride gap in the last dim, 2 reversed-order
    storage seen through a permuted view, 3 every other row of a taller tensor."""
    if how == 0 or x.numel() == 0:
        return x
    if how == 1:
        wide = torch.zeros(*x.shape[:-1], 2 * x.shape[-1] + 1, dtype=x.dtype)
        view = wide[..., 1::2]
        view.copy_(x)
        return view
    if how == 2:
        store = torch.empty(tuple(reversed(x.shape)), dtype=x.dtype).permute(*reversed(range(x.dim())))
        store.copy_(x)
        return store
    wide = torch.zeros(2 * x.shape[0], *x.shape[1:], dtype=x.dtype)
    view = wide[::2]
    view.copy_(x)
    return view


# ---- kernels against their references -------------------------------------------------------------------
EXTREMES = [0.0, -0.0, 1.0, -1.0, 1e-30, -1e-30, 3.4e38, -3.4e38, 1e4, -1e4]


def real_values():
    return st.one_of(st.sampled_from(EXTREMES), st.floats(-2.0, 2.0, width=32))


@st.composite
def mask_stack(draw):
    b, k, p = draw(st.integers(0, 2)), draw(st.integers(0, 5)), draw(st.integers(0, 80))
    dtype = draw(st.sampled_from([torch.uint8, torch.bool, torch.float32, torch.float16]))
    bits = draw(arrays(np.uint8, (b, k, p), elements=st.integers(0, 1)))
    return strided(torch.from_numpy(bits).to(dtype), draw(st.integers(0, 3)))


def _pair_counts(masks):
    """Intersections |m_i ∩ m_j| of every pair of masks of every scan, pixel by pixel."""
    m = masks.to(torch.int64)
    return torch.einsum("bip,bjp->bij", m, m)


def check_pair_counts(masks, triton_device):
    want = _pair_counts(masks)
    assert torch.equal(pair_counts_ref(masks), want)
    got = pair_counts_triton(masks.to(triton_device)).cpu()
    assert torch.equal(got, want), (masks.shape, masks.dtype)


@budget(25)
@given(masks=mask_stack())
def test_pair_counts_kernel(masks, triton_device):
    check_pair_counts(masks, triton_device)


@pytest.mark.slow
@budget(300)
@given(masks=mask_stack())
def test_pair_counts_kernel_slow(masks, triton_device):
    check_pair_counts(masks, triton_device)


@st.composite
def distributions(draw):
    b, r, n = draw(st.integers(0, 2)), draw(st.integers(0, 5)), draw(st.integers(0, 40))
    kind = draw(st.sampled_from(["random", "one_hot", "tiny", "uniform", "sparse"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    if kind == "random":
        x = rng.random((b, r, n))
    elif kind == "one_hot":
        x = np.zeros((b, r, n))
        if n:
            x[..., 0] = 1.0
            x[..., rng.integers(0, n)] += 1.0
    elif kind == "tiny":
        x = rng.random((b, r, n)) * 1e-30 + (rng.random((b, r, n)) > 0.9)
    elif kind == "uniform":
        x = np.ones((b, r, n))
    else:
        x = rng.random((b, r, n)) * (rng.random((b, r, n)) > 0.7)
    total = x.sum(-1, keepdims=True)
    x = np.where(total > 0, x / np.where(total > 0, total, 1.0), 1.0 / max(n, 1))
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    return strided(torch.from_numpy(x).to(dtype), draw(st.integers(0, 3)))


def _js_bits(p: np.ndarray, q: np.ndarray) -> float:
    """JS(P, Q) = KL(P‖M)/2 + KL(Q‖M)/2, M = (P + Q)/2, base 2, 0·log 0 = 0."""
    m = (p + q) / 2
    kl = lambda a: sum(a_i * math.log2(a_i / m_i) for a_i, m_i in zip(a, m) if a_i > 0)  # noqa: E731
    return 0.5 * kl(p) + 0.5 * kl(q)


def check_pairwise_jsd(dists, triton_device):
    d = dists.double().numpy()
    b, r, _ = d.shape
    # Rows rounded to 16 bits may sum to 1 +- 1e-3, which can put the formula a little outside [0, 1]; the op
    # takes rows as given and clamps JS to its range.
    want = torch.tensor([[[0.0 if i == j else min(1.0, max(0.0, _js_bits(d[s, i], d[s, j]))) for j in range(r)]
                          for i in range(r)] for s in range(b)], dtype=torch.float64).reshape(b, r, r)
    assert_close_report(pairwise_jsd_ref(dists), want, 2e-6, 1e-5, "reference vs the JS formula")
    got = pairwise_jsd_triton(dists.to(triton_device)).cpu()
    assert_close_report(got, want, 2e-5 if dists.dtype == torch.float32 else 1e-4, 1e-4, "kernel vs formula")
    assert torch.isfinite(got).all() and (got >= 0).all() and (got <= 1).all()


@budget(25)
@given(dists=distributions())
def test_pairwise_jsd_kernel(dists, triton_device):
    check_pairwise_jsd(dists, triton_device)


@pytest.mark.slow
@budget(300)
@given(dists=distributions())
def test_pairwise_jsd_kernel_slow(dists, triton_device):
    check_pairwise_jsd(dists, triton_device)

BRIDGE = Bridge(1000, 0.3)


@st.composite
def bridge_inputs(draw):
    batch, h, w = draw(st.integers(0, 3)), draw(st.integers(1, 9)), draw(st.integers(1, 9))
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    x0 = torch.from_numpy(rng.integers(0, 2, (batch, 1, h, w)) * 2.0 - 1).float()
    x1 = torch.from_numpy(rng.uniform(-1, 1, (batch, 1, h, w))).float()
    if batch and draw(st.booleans()):
        x1.view(-1)[0] = draw(real_values())
    t = torch.from_numpy(rng.integers(0, BRIDGE.n_timesteps, (batch,)))
    if batch:
        t[0] = draw(st.sampled_from([0, 1, BRIDGE.n_timesteps - 1]))
    seeds = noise_seeds(draw(st.integers(0, 2**31)), [f"c{i}" for i in range(batch)], list(range(batch)))
    how = draw(st.integers(0, 3))
    return strided(x0, how), strided(x1, how), t, seeds, draw(st.booleans())


def check_bridge_sample(inputs, triton_device):
    x0, x1, t, seeds, ot_ode = inputs
    schedule = BRIDGE.schedule("cpu")
    want = bridge_sample_ref(x0, x1, t, schedule, seeds, ot_ode)
    got = bridge_sample_triton(*(v.to(triton_device) for v in (x0, x1, t, schedule, seeds)), ot_ode=ot_ode)
    for name, g, e in zip(("x_t", "label"), got, want):
        assert g.shape == x1.shape
        # the label divides by std_fwd[t], ~0.01 at t = 0: relative tolerance carries the scale
        assert_close_report(g.cpu(), e, 1e-4, 1e-4, name)


@budget(20)
@given(inputs=bridge_inputs())
def test_bridge_sample_kernel(inputs, triton_device):
    check_bridge_sample(inputs, triton_device)


@pytest.mark.slow
@budget(200)
@given(inputs=bridge_inputs())
def test_bridge_sample_kernel_slow(inputs, triton_device):
    check_bridge_sample(inputs, triton_device)


@st.composite
def cfg_inputs(draw):
    batch, h, w = draw(st.integers(0, 3)), draw(st.integers(1, 9)), draw(st.integers(1, 9))
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    halves = draw(st.sampled_from([1, 2]))
    x_n = torch.from_numpy(rng.uniform(-1, 1, (batch, 1, h, w))).float()
    net_out = torch.from_numpy(rng.normal(size=(halves * batch, 1, h, w))).float()
    if batch and draw(st.booleans()):
        net_out.view(-1)[0] = draw(real_values())
    steps = BRIDGE.step_indices(draw(st.integers(1, 12)))
    k = draw(st.integers(1, len(steps) - 1))
    coefs = BRIDGE.sampling_coefs(steps)[k - 1].expand(batch, 4)  # a stride-0 view, as the sampler passes
    seeds = noise_seeds(draw(st.integers(0, 2**31)), [f"c{i}" for i in range(batch)], list(range(batch)))
    guidance = draw(st.sampled_from([0.0, 1.0, 1.7, 7.5]))
    how = draw(st.integers(0, 3))
    return (strided(x_n, how), strided(net_out, how), coefs, seeds, guidance, steps[k], draw(st.booleans()),
            draw(st.booleans()), halves)


def check_cfg_step(inputs, triton_device):
    x_n, net_out, coefs, seeds, guidance, step, add_noise, clamp, halves = inputs
    batch, _, h, w = x_n.shape
    results = []
    for fn, device in ((cfg_step_ref, "cpu"), (cfg_step_triton, triton_device)):
        nxt = torch.full((halves * batch, 2, h, w), float("nan"))
        nxt[:, 1:] = 7.0
        x0 = torch.full((batch, 1, h, w), float("nan"))
        nxt, x0 = nxt.to(device), x0.to(device)
        fn(*(v.to(device) for v in (x_n, net_out, coefs, seeds)), guidance=guidance, step=step,
           add_noise=add_noise, clamp=clamp, next_input=nxt, x0_out=x0)
        results.append((nxt.cpu(), x0.cpu()))
    (want_nxt, want_x0), (got_nxt, got_x0) = results
    if batch:
        assert_close_report(got_x0, want_x0, 1e-4, 1e-5, "x0_hat")
        assert_close_report(got_nxt[:, :1], want_nxt[:, :1], 1e-4, 1e-5, "x_prev")
        assert (got_nxt[:, 1:] == 7.0).all()


@budget(20)
@given(inputs=cfg_inputs())
def test_cfg_step_kernel(inputs, triton_device):
    check_cfg_step(inputs, triton_device)


@pytest.mark.slow
@budget(200)
@given(inputs=cfg_inputs())
def test_cfg_step_kernel_slow(inputs, triton_device):
    check_cfg_step(inputs, triton_device)


# ---- metrics against their definitions ----------------------------------------------------------------------
def iou(a, b) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else np.logical_and(a, b).sum() / union


def dice(a, b) -> float:
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else 2.0 * np.logical_and(a, b).sum() / total


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def definitions(samples: np.ndarray, experts: np.ndarray) -> dict[str, float]:
    """DESIGN.md §6, one pair at a time: S = samples, Y = the present experts."""
    S, Y = [s.astype(bool) for s in samples], [y.astype(bool) for y in experts]
    n, m = len(S), len(Y)
    d = lambda a, b: 1.0 - iou(a, b)  # noqa: E731
    ged = 2 * mean(d(s, y) for s in S for y in Y) - mean(d(a, b) for a in S for b in S) \
        - mean(d(a, b) for a in Y for b in Y)
    d_max = mean(max(dice(s, y) for s in S) for y in Y)

    def spread(X):
        v = [1.0 - dice(X[i], X[j]) for i in range(len(X)) for j in range(i + 1, len(X))]
        return (max(v), min(v)) if v else (0.0, 0.0)

    (y_max, y_min), (s_max, s_min) = spread(Y), spread(S)
    d_a = 1.0 - (abs(y_max - s_max) + abs(y_min - s_min)) / 2
    union_y, union_s = np.any(Y, axis=0), np.any(S, axis=0)
    s_c = 1.0 if union_y.sum() == 0 else np.logical_and(union_y, union_s).sum() / union_y.sum()
    total = s_c + d_max + d_a
    ci = 0.0 if total == 0 else 3 * s_c * d_max * d_a / total
    # HM-IoU: both sets repeated to L = lcm(N, M), the best one-to-one matching by brute force
    L = math.lcm(n, m)
    S_rep, Y_rep = [s for s in S for _ in range(L // n)], [y for y in Y for _ in range(L // m)]
    table = [[iou(y, s) for s in S_rep] for y in Y_rep]
    hm_iou = max(mean(table[i][p[i]] for i in range(L)) for p in itertools.permutations(range(L)))
    # DDI from the M x N Dice matrix
    D = np.array([[dice(y, s) for s in S] for y in Y])
    P = [row / row.sum() if row.sum() > 0 else np.full(n, 1.0 / n) for row in D]
    Q = [col / col.sum() if col.sum() > 0 else np.full(m, 1.0 / m) for col in D.T]
    ddi_e = mean(_js_bits(P[i], P[k]) for i in range(m) for k in range(m) if i != k) if m > 1 else 0.0
    ddi_g = mean(_js_bits(Q[j], Q[k]) for j in range(n) for k in range(n) if j != k) if n > 1 else 0.0
    return {"ged": ged, "d_max": d_max, "d_a": d_a, "s_c": s_c, "ci": ci, "hm_iou": hm_iou, "ddi_e": ddi_e,
            "ddi_g": ddi_g}


@st.composite
def mask_sets(draw):
    """N samples and M expert slots (lcm(N, present M) <= 6 so the matching can be brute-forced), some
    experts missing, masks down to 1x1 with empty and full ones likely."""
    n, m = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    h, w = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    fill = st.sampled_from(["random", "empty", "full"])

    def masks(count):
        out = draw(arrays(np.uint8, (count, h, w), elements=st.integers(0, 1)))
        for i in range(count):
            kind = draw(fill)
            if kind != "random":
                out[i] = 1 if kind == "full" else 0
        return out

    present = np.array(draw(st.lists(st.booleans(), min_size=m, max_size=m)))
    if not present.any():
        present[draw(st.integers(0, m - 1))] = True
    if present.sum() > 3:
        present[np.flatnonzero(present)[3:]] = False
    return masks(n), masks(m), present, draw(st.integers(0, 3))


def check_metrics(sets):
    samples, experts, present, how = sets
    want = definitions(samples, experts[present])
    s, e = (strided(torch.from_numpy(x), how) for x in (samples, experts))
    got = evaluate(s, e, torch.from_numpy(present), device="cpu")
    for key, value in want.items():
        tol = 2e-6 if key.startswith("ddi") else 1e-9  # JS divergences come back through float32
        assert abs(got[key] - value) <= tol, (key, got[key], value)
    assert got["n_samples"] == len(samples) and got["n_experts"] == int(present.sum())


@budget(100)
@given(sets=mask_sets())
def test_metrics_match_definitions(sets):
    check_metrics(sets)


@pytest.mark.slow
@budget(600)
@given(sets=mask_sets())
def test_metrics_match_definitions_slow(sets):
    check_metrics(sets)


# ---- the bridge ---------------------------------------------------------------------------------------------
@st.composite
def schedules(draw):
    n = 2 * draw(st.one_of(st.integers(1, 8), st.integers(1, 2000), st.sampled_from([500, 20_000])))
    beta_max = draw(st.one_of(st.floats(1e-6, 10.0), st.sampled_from([5e-324, 1e-300, 1e-30, 0.3, 1e6, 1e30]),
                              st.floats(min_value=5e-324, max_value=1e300)))
    return n, beta_max


def check_bridge(schedule):
    n, beta_max = schedule
    try:
        bridge = Bridge(n, beta_max)
    except ValueError as err:  # only a beta_max so large that the float32 tables would overflow is refused
        assert "too large" in str(err) and beta_max > 1e3, (n, beta_max, err)
        return
    for name in ("betas", "std_fwd", "std_bwd", "std_sb", "mu_x0", "mu_x1", "noise_levels"):
        table = getattr(bridge, name)
        assert table.shape == (n,) and torch.isfinite(table).all(), name
    for name in ("betas", "std_fwd", "std_bwd", "noise_levels"):
        assert (getattr(bridge, name) > 0).all(), name
    for name in ("mu_x0", "mu_x1", "std_sb"):  # weights of a Gaussian product, and its std
        assert (bridge.f64[name] > 0).all() and (getattr(bridge, name) >= 0).all(), name
    assert ((bridge.mu_x0 <= 1) & (bridge.mu_x1 <= 1)).all()
    assert np.allclose(bridge.f64["mu_x0"] + bridge.f64["mu_x1"], 1.0)
    for nfe in sorted({1, min(2, n - 1), min(7, n - 1), min(n - 1, 999)}):
        steps = bridge.step_indices(nfe)
        assert steps[0] == 0 and steps[-1] == n - 1 and all(a < b for a, b in zip(steps, steps[1:]))
        coefs = bridge.sampling_coefs(steps)
        assert torch.isfinite(coefs).all(), (n, beta_max, nfe)
        std_fwd, mu_x0, mu_xn, std = coefs.unbind(1)
        assert (std_fwd > 0).all() and (mu_x0 >= 0).all() and (mu_xn >= 0).all() and (mu_x0 <= 1).all()
        assert (mu_xn <= 1).all()
        assert std[0] == 0 and (std[1:] > 0).all(), "noise between steps, none into step 0"


@budget(60)
@given(schedule=schedules())
def test_bridge_coefficients(schedule):
    check_bridge(schedule)


@pytest.mark.slow
@budget(400)
@given(schedule=schedules())
def test_bridge_coefficients_slow(schedule):
    check_bridge(schedule)
