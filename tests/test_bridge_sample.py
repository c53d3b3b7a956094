"""`bridge_sample`: the Triton launcher against the PyTorch reference, and the reference against the bridge."""

from __future__ import annotations

import pytest
import torch
from _helpers import DTYPE_TOLERANCES, assert_close_report, non_contiguous
from ssb_fast.kernels import keyed_randn, noise_seeds
from ssb_fast.kernels.bridge_sample import bridge_sample_ref, bridge_sample_triton

from ssb_fast.bridge import Bridge

BRIDGE = Bridge(1000, 0.3)
SIZES = [(8, 8), (17, 23), (64, 64)]
BATCHES = [0, 1, 3, 7]


def make_inputs(batch, size, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = (torch.randint(0, 2, (batch, 1, *size), generator=g).float() * 2 - 1).to(dtype)
    x1 = (torch.rand(batch, 1, *size, generator=g) * 2 - 1).to(dtype)
    t = torch.randint(0, 1000, (batch,), generator=g)
    if batch:
        t[0] = 0
        t[-1] = 999
    seeds = noise_seeds(seed, [f"case{i}" for i in range(batch)], list(range(batch)))
    return [v.to(device) for v in (x0, x1, t, seeds)]


@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_TOLERANCES)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("ot_ode", [False, True])
def test_triton_matches_reference(batch, size, dtype, atol, rtol, ot_ode, triton_device):
    x0, x1, t, seeds = make_inputs(batch, size, dtype, triton_device, seed=batch)
    sched = BRIDGE.schedule(triton_device)
    want_xt, want_label = bridge_sample_ref(x0, x1, t, sched, seeds, ot_ode)
    xt = torch.full_like(x1, float("nan"))
    label = torch.full_like(x1, float("nan"))
    got_xt, got_label = bridge_sample_triton(x0, x1, t, sched, seeds, ot_ode, x_t_out=xt, label_out=label)
    assert got_xt is xt and got_label is label
    assert_close_report(got_xt.cpu(), want_xt.cpu(), atol, rtol, "x_t")
    # label divides by std_fwd[0] = 0.01, which magnifies low-precision rounding of x_t by 100
    scale = 1.0 if dtype == torch.float32 else 100.0
    assert_close_report(got_label.cpu(), want_label.cpu(), atol * scale, rtol, "label")


@pytest.mark.parametrize("batch", [1, 3])
def test_non_contiguous_inputs(batch, triton_device):
    x0, x1, t, seeds = make_inputs(batch, (17, 23), torch.float32, triton_device, seed=3)
    sched = BRIDGE.schedule(triton_device)
    want = bridge_sample_ref(x0, x1, t, sched, seeds)
    x0_nc, x1_nc = non_contiguous(x0), non_contiguous(x1)
    for got in (bridge_sample_ref(x0_nc, x1_nc, t, sched, seeds),
                bridge_sample_triton(x0_nc, x1_nc, t, sched, seeds)):
        for g, w in zip(got, want):
            assert_close_report(g.cpu(), w.cpu(), 2e-5, 1e-5, "non-contiguous")


def test_reference_is_the_bridge_math():
    """The op's x_t is I2SB's q_sample with the keyed noise, and its label is compute_label."""
    x0, x1, t, seeds = make_inputs(5, (9, 11), torch.float32, seed=11)
    x_t, label = torch.ops.ssb_fast.bridge_sample(x0, x1, t, BRIDGE.schedule("cpu"), seeds, False)
    noise = keyed_randn(seeds, 0, 99).view(x0.shape)
    torch.testing.assert_close(x_t, BRIDGE.q_sample(t, x0, x1, noise=noise))
    torch.testing.assert_close(label, BRIDGE.compute_label(t, x0, x_t), atol=1e-4, rtol=1e-5)
    x_t_b, label_b = BRIDGE.bridge_sample(t, x0, x1, seeds)
    assert torch.equal(x_t_b, x_t) and torch.equal(label_b, label)
    mean, _ = BRIDGE.bridge_sample(t, x0, x1, seeds, ot_ode=True)
    torch.testing.assert_close(mean, BRIDGE.q_sample(t, x0, x1, ot_ode=True))


def test_sample_noise_independent_of_batch(triton_device):
    x0, x1, t, seeds = make_inputs(7, (8, 8), torch.float32, triton_device, seed=5)
    sched = BRIDGE.schedule(triton_device)
    full, _ = bridge_sample_triton(x0, x1, t, sched, seeds)
    for i in (0, 4, 6):
        one, _ = bridge_sample_triton(x0[i : i + 1], x1[i : i + 1], t[i : i + 1], sched, seeds[i : i + 1])
        assert torch.equal(one[0], full[i])


def test_bad_input_names_the_argument():
    x0, x1, t, seeds = make_inputs(3, (8, 8), torch.float32, seed=1)
    sched = BRIDGE.schedule("cpu")
    op = torch.ops.ssb_fast.bridge_sample
    with pytest.raises(ValueError, match="x0 and x1 must have one shape"):
        op(x0, x1[:, :, :4], t, sched, seeds, False)
    with pytest.raises(TypeError, match="x0 must have dtype"):
        op(x0.to(torch.int32), x1, t, sched, seeds, False)
    with pytest.raises(TypeError, match="x0 and x1 must share a dtype"):
        op(x0.half(), x1, t, sched, seeds, False)
    with pytest.raises(TypeError, match="t must have dtype int64"):
        op(x0, x1, t.int(), sched, seeds, False)
    with pytest.raises(ValueError, match=r"t must have shape \(3,\)"):
        op(x0, x1, t[:2], sched, seeds, False)
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1000\)"):
        op(x0, x1, torch.tensor([0, 1000, 3]), sched, seeds, False)
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1000\)"):
        op(x0, x1, torch.tensor([0, -1, 3]), sched, seeds, False)
    with pytest.raises(ValueError, match="seeds must have shape"):
        op(x0, x1, t, sched, seeds[:1], False)
    with pytest.raises(ValueError, match="schedule must be"):
        op(x0, x1, t, sched[:3], seeds, False)


def test_bad_input_in_the_launcher(triton_device):
    x0, x1, t, seeds = make_inputs(2, (8, 8), torch.float32, triton_device, seed=1)
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1000\)"):
        bridge_sample_triton(x0, x1, t + 1000, BRIDGE.schedule(triton_device), seeds)
    with pytest.raises(ValueError, match="x_t_out must be contiguous"):
        bridge_sample_triton(x0, x1, t, BRIDGE.schedule(triton_device), seeds, x_t_out=torch.empty(3))
