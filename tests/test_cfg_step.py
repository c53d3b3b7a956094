"""`cfg_step`: the Triton launcher against the PyTorch reference, and the reference against the bridge."""

from __future__ import annotations

import pytest
import torch
from _helpers import DTYPE_TOLERANCES, assert_close_report, non_contiguous
from ssb_fast.kernels import keyed_randn, noise_seeds
from ssb_fast.kernels.cfg_step import cfg_step_ref, cfg_step_triton

from ssb_fast.bridge import Bridge

BRIDGE = Bridge(1000, 0.3)
STEPS = BRIDGE.step_indices(10)
COEFS = BRIDGE.sampling_coefs(STEPS)
SIZES = [(8, 8), (17, 23), (64, 64)]
BATCHES = [0, 1, 3, 7]
SCAN_CHANNELS = 2
SENTINEL = 12345.0


def make_inputs(batch, size, dtype, out_dtype=None, device="cpu", seed=0, row=5):
    g = torch.Generator().manual_seed(seed)
    x_n = (torch.rand(batch, 1, *size, generator=g) * 2 - 1).to(dtype)
    net_out = torch.randn(2 * batch, 1, *size, generator=g).to(out_dtype or dtype)
    coefs = COEFS[row].expand(batch, 4)  # one step for the whole chunk: a stride-0 view
    seeds = noise_seeds(seed, [f"case{i // 2}" for i in range(batch)], list(range(batch)))
    return [v.to(device) for v in (x_n, net_out, coefs, seeds)]


def poisoned_buffers(batch, size, dtype, device, channels_last=False):
    """A 2B input buffer whose x_t channel is NaN and whose scan channels hold a sentinel, plus a NaN x0̂."""
    nxt = torch.full((2 * batch, 1 + SCAN_CHANNELS, *size), float("nan"), dtype=dtype, device=device)
    nxt[:, 1:] = SENTINEL
    if channels_last:
        nxt = nxt.contiguous(memory_format=torch.channels_last)
    x0 = torch.full((batch, 1, *size), float("nan"), dtype=torch.float32, device=device)
    return nxt, x0


def run_both(args, kwargs, batch, size, dtype, device, channels_last=False):
    results = []
    for fn in (cfg_step_ref, cfg_step_triton):
        nxt, x0 = poisoned_buffers(batch, size, dtype, device, channels_last)
        fn(*args, next_input=nxt, x0_out=x0, **kwargs)
        results.append((nxt.cpu(), x0.cpu()))
    return results


@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_TOLERANCES)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("batch", BATCHES)
def test_triton_matches_reference(batch, size, dtype, atol, rtol, triton_device):
    args = make_inputs(batch, size, dtype, device=triton_device, seed=batch)
    kwargs = dict(guidance=1.7, step=STEPS[6], add_noise=True, clamp=True)
    (want_nxt, want_x0), (got_nxt, got_x0) = run_both(args, kwargs, batch, size, dtype, triton_device)
    assert_close_report(got_nxt[:, :1], want_nxt[:, :1], atol, rtol, "x_prev")
    assert_close_report(got_x0, want_x0, 2e-5, 1e-5, "x0_hat")
    assert torch.equal(got_nxt[:batch, :1], got_nxt[batch:, :1]), "both halves must hold the same x_prev"
    assert (got_nxt[:, 1:] == SENTINEL).all(), "scan channels must stay untouched"


@pytest.mark.parametrize("guidance", [0.0, 1.0, 3.0])
@pytest.mark.parametrize("add_noise,clamp", [(False, False), (True, False), (False, True)])
def test_flags_and_guidance(guidance, add_noise, clamp, triton_device):
    args = make_inputs(3, (17, 23), torch.float32, device=triton_device, seed=2, row=0)
    kwargs = dict(guidance=guidance, step=STEPS[1], add_noise=add_noise, clamp=clamp)
    (want_nxt, want_x0), (got_nxt, got_x0) = run_both(args, kwargs, 3, (17, 23), torch.float32, triton_device)
    assert_close_report(got_nxt[:, :1], want_nxt[:, :1], 2e-5, 1e-5, "x_prev")
    assert_close_report(got_x0, want_x0, 2e-5, 1e-5, "x0_hat")


def test_channels_last_buffer_and_non_contiguous_inputs(triton_device):
    x_n, net_out, coefs, seeds = make_inputs(3, (17, 23), torch.float32, torch.bfloat16, triton_device, seed=4)
    kwargs = dict(guidance=2.0, step=STEPS[3], add_noise=True, clamp=True)
    nxt_ref, x0_ref = poisoned_buffers(3, (17, 23), torch.float32, triton_device)
    cfg_step_ref(x_n, net_out, coefs, seeds, next_input=nxt_ref, x0_out=x0_ref, **kwargs)
    x_n_nc = non_contiguous(x_n)
    out_cl = net_out.contiguous(memory_format=torch.channels_last)
    coefs_full = coefs.contiguous()
    for fn in (cfg_step_ref, cfg_step_triton):
        nxt, x0 = poisoned_buffers(3, (17, 23), torch.float32, triton_device, channels_last=True)
        x0_nc = non_contiguous(x0)
        fn(x_n_nc, out_cl, coefs_full, seeds, next_input=nxt, x0_out=x0_nc, **kwargs)
        assert_close_report(nxt.cpu(), nxt_ref.cpu(), 2e-5, 1e-5, fn.__name__)
        assert_close_report(x0_nc.cpu(), x0_ref.cpu(), 2e-5, 1e-5, fn.__name__)


def test_reference_is_the_bridge_math():
    """x_prev = posterior(x0̂ = pred_x0(u + w(c - u)), x_n) + std z with the keyed z, written to both halves."""
    x_n, net_out, coefs, seeds = make_inputs(4, (9, 7), torch.float32, seed=8, row=4)
    prev, cur = STEPS[4], STEPS[5]
    w = 1.5
    nxt = torch.zeros(8, 3, 9, 7)
    x0 = torch.zeros(4, 1, 9, 7)
    torch.ops.ssb_fast.cfg_step(x_n, net_out, coefs, seeds, w, cur, True, True, nxt, x0)
    guided = net_out[4:] + w * (net_out[:4] - net_out[4:])
    want_x0 = BRIDGE.compute_pred_x0(cur, x_n, guided, clamp=True)
    mu_x0, mu_xn, std = BRIDGE.posterior_coefs(prev, cur)
    z = keyed_randn(seeds, cur * 63, 63).view(4, 1, 9, 7)
    want = mu_x0 * want_x0 + mu_xn * x_n + std * z
    torch.testing.assert_close(x0, want_x0)
    torch.testing.assert_close(nxt[:4, :1], want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(nxt[4:, :1], want, atol=1e-5, rtol=1e-5)
    assert (nxt[:, 1:] == 0).all()


def test_mask_noise_independent_of_batch(triton_device):
    """Mask i gets the same x_prev in a chunk of 7 as alone: the noise is keyed by the mask."""
    args = make_inputs(7, (8, 8), torch.float32, device=triton_device, seed=6)
    kwargs = dict(guidance=1.0, step=STEPS[8], add_noise=True, clamp=True)
    nxt7, _ = poisoned_buffers(7, (8, 8), torch.float32, triton_device)
    cfg_step_triton(*args, next_input=nxt7, **kwargs)
    x_n, net_out, coefs, seeds = args
    for i in (0, 3, 6):
        nxt1, _ = poisoned_buffers(1, (8, 8), torch.float32, triton_device)
        one_out = torch.cat([net_out[i : i + 1], net_out[7 + i : 8 + i]])
        cfg_step_triton(x_n[i : i + 1], one_out, coefs[i : i + 1], seeds[i : i + 1], next_input=nxt1, **kwargs)
        assert torch.equal(nxt1[0, :1], nxt7[i, :1])


def test_bad_input_names_the_argument():
    x_n, net_out, coefs, seeds = make_inputs(3, (8, 8), torch.float32, seed=1)
    nxt = torch.zeros(6, 3, 8, 8)
    op = torch.ops.ssb_fast.cfg_step
    with pytest.raises(ValueError, match="net_out must be the 2B network output"):
        op(x_n, net_out[:4], coefs, seeds, 1.0, 10, True, True, nxt, None)
    with pytest.raises(ValueError, match=r"next_input must be a \(3, >= C"):
        op(x_n, net_out[:3], coefs, seeds, 1.0, 10, True, True, nxt, None)
    with pytest.raises(ValueError, match="step_index must have shape"):
        op(x_n, net_out, coefs, seeds, 1.0, 10, True, True, nxt, None, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="net_out must be the 2B network output"):
        op(x_n, net_out[:, :, :4], coefs, seeds, 1.0, 10, True, True, nxt, None)
    with pytest.raises(TypeError, match="x_n must have dtype"):
        op(x_n.double(), net_out, coefs, seeds, 1.0, 10, True, True, nxt, None)
    with pytest.raises(TypeError, match="next_input must share x_n's dtype"):
        op(x_n, net_out, coefs, seeds, 1.0, 10, True, True, nxt.half(), None)
    with pytest.raises(ValueError, match="next_input must be a"):
        op(x_n, net_out, coefs, seeds, 1.0, 10, True, True, nxt[:4], None)
    with pytest.raises(ValueError, match=r"coefs must be \(B, 4\)"):
        op(x_n, net_out, coefs[:, :3], seeds, 1.0, 10, True, True, nxt, None)
    with pytest.raises(TypeError, match="seeds must have dtype int64"):
        op(x_n, net_out, coefs, seeds.int(), 1.0, 10, True, True, nxt, None)
    with pytest.raises(ValueError, match="x0_out must have x_n's shape"):
        op(x_n, net_out, coefs, seeds, 1.0, 10, True, True, nxt, torch.zeros(3, 1, 8, 7))
    with pytest.raises(ValueError, match="x_n must be"):
        op(x_n[0], net_out, coefs, seeds, 1.0, 10, True, True, nxt, None)
    with pytest.raises(ValueError, match="32-bit Philox counter"):
        op(x_n, net_out, coefs, seeds, 1.0, 2**32 // 64, True, True, nxt, None)


def test_bad_input_in_the_launcher(triton_device):
    x_n, net_out, coefs, seeds = make_inputs(2, (8, 8), torch.float32, device=triton_device, seed=1)
    nxt = torch.zeros(4, 2, 8, 8, device=triton_device)
    with pytest.raises(ValueError, match="net_out must be the 2B network output"):
        cfg_step_triton(x_n, net_out[:3], coefs, seeds, 1.0, 5, True, True, nxt)


@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_TOLERANCES)
@pytest.mark.parametrize("batch", [0, 1, 5])
def test_b_row_output_matches_reference(batch, dtype, atol, rtol, triton_device):
    """At w = 1 or 0 the sampler passes B rows (the guided output) and a B-row next input."""
    x_n, net_out, coefs, seeds = make_inputs(batch, (17, 23), dtype, device=triton_device, seed=9)
    kwargs = dict(guidance=1.0, step=STEPS[7], add_noise=True, clamp=True)
    results = []
    for fn in (cfg_step_ref, cfg_step_triton):
        nxt, x0 = poisoned_buffers(batch, (17, 23), dtype, triton_device)
        nxt = nxt[:batch]
        fn(x_n, net_out[:batch], coefs, seeds, next_input=nxt, x0_out=x0, **kwargs)
        results.append((nxt.cpu(), x0.cpu()))
    (want_nxt, want_x0), (got_nxt, got_x0) = results
    assert_close_report(got_nxt[:, :1], want_nxt[:, :1], atol, rtol, "x_prev")
    assert_close_report(got_x0, want_x0, 2e-5, 1e-5, "x0_hat")
    assert (got_nxt[:, 1:] == SENTINEL).all(), "scan channels must stay untouched"


@pytest.mark.parametrize("guidance,half", [(1.0, 0), (0.0, 1)])
def test_b_row_output_is_the_guided_half(guidance, half):
    """B rows of c (w = 1) or u (w = 0) give the 2B step's x_prev, up to the rounding of u + w (c - u)."""
    x_n, net_out, coefs, seeds = make_inputs(4, (9, 7), torch.float32, seed=3, row=4)
    kwargs = dict(guidance=guidance, step=STEPS[5], add_noise=True, clamp=True)
    nxt2, x02 = torch.zeros(8, 2, 9, 7), torch.zeros(4, 1, 9, 7)
    cfg_step_ref(x_n, net_out, coefs, seeds, next_input=nxt2, x0_out=x02, **kwargs)
    nxt1, x01 = torch.zeros(4, 2, 9, 7), torch.zeros(4, 1, 9, 7)
    cfg_step_ref(x_n, net_out[4 * half : 4 * half + 4], coefs, seeds, next_input=nxt1, x0_out=x01, **kwargs)
    torch.testing.assert_close(x01, x02, atol=1e-6, rtol=0)
    torch.testing.assert_close(nxt1[:, :1], nxt2[:4, :1], atol=1e-6, rtol=0)
    # a wrong half would be far off: the two halves are independent draws
    other = net_out[4 * (1 - half) : 4 * (1 - half) + 4]
    cfg_step_ref(x_n, other, coefs, seeds, next_input=nxt1, x0_out=x01, **kwargs)
    assert (x01 - x02).abs().max() > 1e-2


def test_step_index_tensor_keys_the_noise_like_the_step(triton_device):
    """A captured CUDA graph reads the step from a device tensor; the noise must equal the int step's."""
    args = make_inputs(3, (8, 8), torch.float32, device=triton_device, seed=5)
    kwargs = dict(guidance=1.5, add_noise=True, clamp=True)
    want, _ = poisoned_buffers(3, (8, 8), torch.float32, triton_device)
    cfg_step_ref(*args, step=STEPS[4], next_input=want, **kwargs)
    for fn in (cfg_step_ref, cfg_step_triton):
        got, _ = poisoned_buffers(3, (8, 8), torch.float32, triton_device)
        index = torch.tensor([STEPS[4]], device=triton_device)
        fn(*args, step=STEPS[-1], next_input=got, step_index=index, **kwargs)  # step only bounds the span
        assert_close_report(got[:, :1].cpu(), want[:, :1].cpu(), 2e-5, 1e-5, fn.__name__)
        other, _ = poisoned_buffers(3, (8, 8), torch.float32, triton_device)
        fn(*args, step=STEPS[-1], next_input=other, step_index=index + 1, **kwargs)
        assert not torch.allclose(other[:, :1].cpu(), want[:, :1].cpu())
