"""The I2SB bridge against independent float64 closed forms and a transcription of I2SB's rules."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ssb_fast.bridge import Bridge

CONFIGS = [(1000, 0.3), (200, 1.0)]


def closed_forms(n: int, beta_max: float) -> dict[str, np.ndarray]:
    """The bridge definitions written out again, element by element in float64."""
    lo, hi = math.sqrt(1e-4), math.sqrt(beta_max / n)
    b = np.array([(lo + (hi - lo) * i / (n - 1)) ** 2 for i in range(n)])
    betas = np.concatenate([b[: n // 2], b[: n // 2][::-1]])
    var_fwd = np.array([betas[: i + 1].sum() for i in range(n)])
    var_bwd = np.array([betas[i:].sum() for i in range(n)])
    return {
        "betas": betas,
        "std_fwd": np.sqrt(var_fwd),
        "std_bwd": np.sqrt(var_bwd),
        "mu_x0": var_bwd / (var_fwd + var_bwd),
        "mu_x1": var_fwd / (var_fwd + var_bwd),
        "std_sb": np.sqrt(var_fwd * var_bwd / (var_fwd + var_bwd)),
    }


def transcribed_steps(n: int, nfe: int) -> list[int]:
    """The step rule as prose says it: float stride (n-1)/nfe accumulated, rounded half to even."""
    stride = (n - 1) / nfe
    out, acc = [], 0.0
    for _ in range(nfe + 1):
        frac = acc - math.floor(acc)
        if frac == 0.5:
            idx = math.floor(acc) + (math.floor(acc) % 2)  # the even neighbour
        else:
            idx = math.floor(acc + 0.5)
        out.append(int(idx))
        acc += stride
    return out


@pytest.mark.parametrize("n,beta_max", CONFIGS)
def test_schedules_match_float64_closed_forms(n, beta_max):
    bridge = Bridge(n, beta_max)
    ref = closed_forms(n, beta_max)
    for name, want in ref.items():
        got = getattr(bridge, name)
        assert got.dtype == torch.float32 and got.shape == (n,), name
        np.testing.assert_allclose(got.numpy(), want.astype(np.float32), rtol=2e-6, atol=0, err_msg=name)


def test_schedule_landmarks():
    bridge = Bridge(1000, 0.3)
    assert bridge.betas[0].item() == pytest.approx(1e-4, rel=1e-6)
    assert bridge.betas[-1].item() == pytest.approx(1e-4, rel=1e-6)
    # symmetric: the largest beta sits in the middle, twice
    assert bridge.betas[499].item() == bridge.betas[500].item()
    assert torch.allclose(bridge.mu_x0 + bridge.mu_x1, torch.ones(1000))
    # the bridge is pinned at both ends: nearly x0 at t=0, nearly x1 at t=n-1
    assert bridge.mu_x0[0] > 0.999 and bridge.mu_x1[-1] > 0.999
    np.testing.assert_allclose(bridge.std_fwd[-1].item() ** 2, bridge.betas.double().sum().item(), rtol=1e-6)


@pytest.mark.parametrize("n", [1000, 200])
@pytest.mark.parametrize("nfe", [1, 2, 5, 10, 18, 20, 50, 100, None])
def test_step_indices_match_the_rule(n, nfe):
    nfe = n - 1 if nfe is None else nfe
    steps = Bridge(n).step_indices(nfe)
    assert steps == transcribed_steps(n, nfe)
    assert len(steps) == nfe + 1 and steps[0] == 0 and steps[-1] == n - 1
    assert all(b > a for a, b in zip(steps, steps[1:]))


def test_step_indices_known_lists():
    bridge = Bridge(1000)
    nfe50 = bridge.step_indices(50)
    assert nfe50[:26] == list(range(0, 520, 20)) and nfe50[26:28] == [519, 539] and nfe50[-1] == 999
    assert bridge.step_indices(2) == [0, 500, 999]  # 499.5 rounds to the even 500
    # 999/18 = 55.5 exactly: 3*55.5 = 166.5 must round half to even (166), not up (167)
    assert bridge.step_indices(18)[3] == 166
    assert bridge.step_indices(999) == list(range(1000))


@pytest.mark.parametrize("n,beta_max", CONFIGS)
@pytest.mark.parametrize("nfe", [1, 5, 20, 100])
def test_posterior_coefs_along_step_lists(n, beta_max, nfe):
    bridge = Bridge(n, beta_max)
    ref = closed_forms(n, beta_max)
    steps = bridge.step_indices(nfe)
    table = bridge.sampling_coefs(steps)
    assert table.shape == (nfe, 4) and table.dtype == torch.float32
    for k, (prev, cur) in enumerate(zip(steps[:-1], steps[1:])):
        var_p, var_n = ref["std_fwd"][prev] ** 2, ref["std_fwd"][cur] ** 2
        var_d = var_n - var_p
        want = (var_d / (var_p + var_d), var_p / (var_p + var_d), math.sqrt(var_p * var_d / (var_p + var_d)))
        got = bridge.posterior_coefs(prev, cur)
        assert all(isinstance(v, float) for v in got)
        np.testing.assert_allclose(got[:2], want[:2], rtol=1e-12)
        if prev == 0:
            assert got[2] == 0.0
        else:
            np.testing.assert_allclose(got[2], want[2], rtol=1e-12)
        np.testing.assert_allclose(table[k].numpy(), [ref["std_fwd"][cur], *got], rtol=1e-6)


def test_posterior_matches_i2sb_float32_arithmetic():
    """I2SB computes p_posterior in float32 torch from the float32 std_fwd; agree to float32 precision."""
    bridge = Bridge(1000, 0.3)
    for prev, cur in zip(bridge.step_indices(50)[:-1], bridge.step_indices(50)[1:]):
        std_n, std_p = bridge.std_fwd[cur], bridge.std_fwd[prev]
        std_d = (std_n**2 - std_p**2).sqrt()
        denom = std_p**2 + std_d**2
        mu_x0, mu_xn, var = std_d**2 / denom, std_p**2 / denom, std_p**2 * std_d**2 / denom
        got = bridge.posterior_coefs(prev, cur)
        np.testing.assert_allclose(got[0], mu_x0.item(), rtol=1e-5)
        np.testing.assert_allclose(got[1], mu_xn.item(), rtol=1e-5)
        np.testing.assert_allclose(got[2], 0.0 if prev == 0 else var.sqrt().item(), rtol=1e-5)


def test_q_sample_label_and_inverse():
    bridge = Bridge(1000)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, 2, (4, 1, 6, 5), generator=g).float() * 2 - 1
    x1 = torch.rand(4, 1, 6, 5, generator=g) * 2 - 1
    noise = torch.randn(4, 1, 6, 5, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    x_t = bridge.q_sample(t, x0, x1, noise=noise)
    ref = closed_forms(1000, 0.3)
    for i, ti in enumerate(t.tolist()):
        want = ref["mu_x0"][ti] * x0[i].double() + ref["mu_x1"][ti] * x1[i].double() + ref["std_sb"][ti] * noise[i]
        torch.testing.assert_close(x_t[i].double(), want, atol=1e-5, rtol=1e-5)
    mean = bridge.q_sample(t, x0, x1, ot_ode=True)
    torch.testing.assert_close(x_t - mean, bridge.std_sb[t].view(-1, 1, 1, 1) * noise)
    label = bridge.compute_label(t, x0, x_t)
    torch.testing.assert_close(label, (x_t - x0) / bridge.std_fwd[t].view(-1, 1, 1, 1))
    torch.testing.assert_close(bridge.compute_pred_x0(t, x_t, label, clamp=False), x0, atol=1e-5, rtol=0)
    far = bridge.compute_pred_x0(t, x_t, label - 1e3, clamp=True)
    assert far.max() <= 1.0 and far.min() >= -1.0
    # a scalar step broadcasts over the batch
    torch.testing.assert_close(bridge.compute_label(7, x0, x_t), (x_t - x0) / bridge.std_fwd[7])


def test_time_input_is_i2sb_noise_levels():
    bridge = Bridge(1000)
    t = torch.tensor([0, 1, 999])
    want = torch.tensor([1e-4 * 1000, (1e-4 + (1 - 1e-4) / 999) * 1000, 1000.0])
    torch.testing.assert_close(bridge.time_input(t), want)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="n_timesteps must be even"):
        Bridge(999)
    with pytest.raises(ValueError, match="beta_max"):
        Bridge(1000, -1.0)
    bridge = Bridge(1000)
    for nfe in (0, 1000, 2.5):
        with pytest.raises(ValueError, match="nfe"):
            bridge.step_indices(nfe)
    with pytest.raises(ValueError, match="prev must be < n"):
        bridge.posterior_coefs(10, 10)
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1000\)"):
        bridge.q_sample(torch.tensor([1000]), torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2))
    with pytest.raises(ValueError, match="x0 and x1"):
        bridge.q_sample(3, torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 3, 2))
