"""The Sampler: CFG wiring, the shared first step, chunking and keyed noise, against a plain I2SB loop."""

from __future__ import annotations

import pytest
import torch
from ssb_fast.kernels import keyed_randn, noise_seeds
from torch import nn

from ssb_fast.bridge import Bridge
from ssb_fast.sampler import Sampler, expert_labels

BRIDGE = Bridge(1000, 0.3)
N_LABELS = 4


class ToyNet(nn.Module):
    """A small conditional conv net: enough structure that a wiring mistake changes the output."""

    def __init__(self, scan_channels=1, n_labels=N_LABELS):
        super().__init__()
        torch.manual_seed(0)
        self.null_label = n_labels
        self.embed = nn.Embedding(n_labels + 1, 8)
        self.conv1 = nn.Conv2d(1 + scan_channels, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 1, 3, padding=1)

    def forward(self, x, t, label):
        h = self.conv1(x) + self.embed(label)[:, :, None, None] + (t[:, None, None, None] / 1000.0)
        return self.conv2(torch.tanh(h)) * 3.0


class OracleNet(nn.Module):
    """Knows the true mask for each label (a disk of radius 2 + 2*label) and answers with the exact I2SB label."""

    def __init__(self, size=16):
        super().__init__()
        yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
        r = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2).sqrt()
        disks = [(r < 2 + 2 * k).float() * 2 - 1 for k in range(N_LABELS + 1)]
        self.register_buffer("disks", torch.stack(disks)[:, None])
        self.null_label = N_LABELS

    def forward(self, x, t, label):
        step = torch.round((t / 1000 - 1e-4) / (1 - 1e-4) * 999).long()
        std = BRIDGE.std_fwd[step].view(-1, 1, 1, 1)
        return (x[:, :1] - self.disks[label]) / std


def plain_i2sb_loop(net, scans, n_samples, nfe, guidance, case_ids, seed=0, first_step_noise=1.0):
    """I2SB's ddpm_sampling with CFG, written directly (torch.cat, no shared step, no fused op); the first
    step's noise std times `first_step_noise`."""
    steps = BRIDGE.step_indices(nfe)
    out_soft = []
    for s, scan in enumerate(scans):
        labels = torch.arange(n_samples) % N_LABELS
        seeds = noise_seeds(seed, [case_ids[s]] * n_samples, list(range(n_samples)))
        scan_b = scan.expand(n_samples, -1, -1, -1)
        x = scan_b[:, :1].clone()
        pixels = x[0].numel()
        for prev, n in zip(steps[::-1][1:], steps[::-1][:-1]):
            t = BRIDGE.time_input(torch.full((2 * n_samples,), n))
            inp = torch.cat([torch.cat([x, scan_b], 1)] * 2)
            lab = torch.cat([labels, torch.full_like(labels, N_LABELS)])
            out = net(inp, t, lab)
            guided = out[n_samples:] + guidance * (out[:n_samples] - out[n_samples:])
            x0 = BRIDGE.compute_pred_x0(n, x, guided)
            mu_x0, mu_xn, std = BRIDGE.posterior_coefs(prev, n)
            x = mu_x0 * x0 + mu_xn * x
            if n == steps[-1]:
                std = std * first_step_noise
            if prev > 0:
                x = x + std * keyed_randn(seeds, n * pixels, pixels).view(x.shape)
        out_soft.append(x0[:, 0])
    return torch.stack(out_soft)


def scans_for(n_scans, size=16, channels=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n_scans, channels, size, size, generator=g) * 2 - 1


@pytest.mark.parametrize("guidance", [0.0, 1.0, 2.0])
def test_matches_plain_i2sb_loop(guidance):
    net = ToyNet().eval()
    scans = scans_for(2)
    ids = ["caseA", "caseB"]
    result = Sampler(net, BRIDGE, nfe=6, guidance=guidance, max_batch=5).sample(scans, 7, ids, return_soft=True)
    want = plain_i2sb_loop(net, scans, 7, 6, guidance, ids)
    torch.testing.assert_close(result.soft, want, atol=2e-5, rtol=1e-5)
    assert torch.equal(result.masks, (want > 0).to(torch.uint8))
    assert result.masks.shape == (2, 7, 16, 16) and result.masks.dtype == torch.uint8


@pytest.mark.parametrize("guidance", [1.0, 2.0])
def test_first_step_noise_scales_only_the_first_steps_noise(guidance):
    net = ToyNet().eval()
    scans = scans_for(2, seed=3)
    ids = ["caseA", "caseB"]
    result = Sampler(net, BRIDGE, nfe=5, guidance=guidance, first_step_noise=2.5, max_batch=4).sample(
        scans, 6, ids, return_soft=True)
    want = plain_i2sb_loop(net, scans, 6, 5, guidance, ids, first_step_noise=2.5)
    torch.testing.assert_close(result.soft, want, atol=2e-5, rtol=1e-5)
    plain = plain_i2sb_loop(net, scans, 6, 5, guidance, ids)
    assert (want - plain).abs().max() > 1e-3  # the setting reaches the masks
    for bad in (0.0, -1.0, float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match="first_step_noise"):
            Sampler(net, BRIDGE, nfe=5, first_step_noise=bad)


def test_oracle_recovers_each_experts_mask_and_guidance_picks_the_half():
    net = OracleNet()
    scans = scans_for(1)
    cond = Sampler(net, BRIDGE, nfe=5, guidance=1.0).sample(scans, 8)
    for i in range(8):
        want = (net.disks[i % N_LABELS, 0] > 0).to(torch.uint8)
        assert torch.equal(cond.masks[0, i], want), f"mask {i} should be expert {i % N_LABELS}'s disk"
    assert cond.labels[0].tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    uncond = Sampler(net, BRIDGE, nfe=5, guidance=0.0).sample(scans, 3)
    assert all(torch.equal(uncond.masks[0, i], (net.disks[N_LABELS, 0] > 0).to(torch.uint8)) for i in range(3))


def test_results_do_not_depend_on_chunking_or_step_sharing():
    net = ToyNet().eval()
    scans = scans_for(3, seed=1)
    ref = Sampler(net, BRIDGE, nfe=4, max_batch=64).sample(scans, 6, return_soft=True)
    for kwargs in ({"max_batch": 1}, {"max_batch": 4}, {"max_batch": 7, "share_first_step": False}):
        got = Sampler(net, BRIDGE, nfe=4, **kwargs).sample(scans, 6, return_soft=True)
        torch.testing.assert_close(got.soft, ref.soft, atol=1e-5, rtol=1e-5)
    # one scan alone gives the same masks as inside a batch of three (noise keyed by case id, not position)
    alone = Sampler(net, BRIDGE, nfe=4).sample(scans[1:2], 6, case_ids=["1"], return_soft=True)
    torch.testing.assert_close(alone.soft[0], ref.soft[1], atol=1e-5, rtol=1e-5)


def test_noise_makes_masks_differ_and_the_seed_reproduces_them():
    net = ToyNet().eval()
    scans = scans_for(1, seed=2)
    a = Sampler(net, BRIDGE, nfe=8, seed=0, labels="random").sample(scans, 8, return_soft=True)
    b = Sampler(net, BRIDGE, nfe=8, seed=0, labels="random").sample(scans, 8, return_soft=True)
    c = Sampler(net, BRIDGE, nfe=8, seed=1, labels="random").sample(scans, 8, return_soft=True)
    assert torch.equal(a.soft, b.soft)
    assert not torch.allclose(a.soft, c.soft)
    same_label = (a.labels[0] == a.labels[0, 0]).nonzero().flatten().tolist()
    assert len(same_label) >= 2 or a.labels.unique().numel() > 1
    # ot_ode (deterministic) masks with one label are identical; stochastic ones are not
    det = Sampler(net, BRIDGE, nfe=8, ot_ode=True).sample(scans, 8, labels=torch.zeros(8, dtype=torch.long),
                                                           return_soft=True)
    assert torch.equal(det.soft[0, 0], det.soft[0, 5])
    sto = Sampler(net, BRIDGE, nfe=8).sample(scans, 8, labels=torch.zeros(8, dtype=torch.long), return_soft=True)
    assert not torch.equal(sto.soft[0, 0], sto.soft[0, 5])


def test_shared_first_step_saves_network_rows():
    net = ToyNet().eval()
    scans = scans_for(2)
    shared = Sampler(net, BRIDGE, nfe=5, guidance=1.5, max_batch=64).sample(scans, 16)
    # first step: 2 scans x (4 experts + null) rows; then 4 steps x 2B rows with B = 32
    assert shared.stats["network_rows"] == 2 * 5 + 4 * 64
    plain = Sampler(net, BRIDGE, nfe=5, guidance=1.5, max_batch=64, share_first_step=False).sample(scans, 16)
    assert plain.stats["network_rows"] == 5 * 64
    assert shared.stats["chunks"] == 1 and shared.stats["masks"] == 32
    assert shared.stats["padding_rows"] == 0 and shared.stats["warmup_seconds"] == 0  # eager CPU: nothing to pad


@pytest.mark.parametrize("guidance", [1.0, 0.0])
def test_guidance_one_or_zero_evaluates_one_half(guidance):
    """At w = 1 (or 0) a step evaluates the B conditional (or null-label) rows only: N x NFE rows, the
    shared first step aside, and the masks equal those of the 2B path up to float rounding."""
    net = ToyNet().eval()
    scans = scans_for(2, seed=5)
    fast = Sampler(net, BRIDGE, nfe=5, guidance=guidance, max_batch=64).sample(scans, 16, return_soft=True)
    distinct = 2 * 4 if guidance == 1.0 else 2  # (scan, expert) pairs; or one null-label row per scan
    assert fast.stats["network_rows"] == distinct + 4 * 32 and fast.stats["rows_per_step"] == 1
    full = Sampler(net, BRIDGE, nfe=5, guidance=guidance, max_batch=64,
                   guidance_fast_path=False).sample(scans, 16, return_soft=True)
    assert full.stats["network_rows"] == 2 * 5 + 4 * 64 and full.stats["rows_per_step"] == 2
    torch.testing.assert_close(fast.soft, full.soft, atol=1e-5, rtol=0)
    assert torch.equal(fast.masks, full.masks)


def test_oracle_b_row_path_picks_the_right_half():
    """With the oracle net, w = 1 on B rows gives each expert's disk and w = 0 the null label's."""
    net = OracleNet()
    scans = scans_for(1)
    cond = Sampler(net, BRIDGE, nfe=5, guidance=1.0, max_batch=3).sample(scans, 5)
    for i in range(5):
        assert torch.equal(cond.masks[0, i], (net.disks[i % N_LABELS, 0] > 0).to(torch.uint8))
    uncond = Sampler(net, BRIDGE, nfe=5, guidance=0.0, max_batch=3).sample(scans, 5)
    assert all(torch.equal(uncond.masks[0, i], (net.disks[N_LABELS, 0] > 0).to(torch.uint8)) for i in range(5))


def test_expert_labels_modes():
    assert expert_labels(["a", "b"], 5, 3).tolist() == [[0, 1, 2, 0, 1]] * 2
    r1 = expert_labels(["a", "b"], 50, 4, "random", seed=3)
    r2 = expert_labels(["b"], 50, 4, "random", seed=3)
    assert torch.equal(r1[1], r2[0]) and set(r1.flatten().tolist()) == {0, 1, 2, 3}
    with pytest.raises(ValueError, match="labels must be one of"):
        expert_labels(["a"], 2, 4, "sorted")


def test_empty_requests():
    net = ToyNet().eval()
    assert Sampler(net, BRIDGE, nfe=3).sample(scans_for(2), 0).masks.shape == (2, 0, 16, 16)
    assert Sampler(net, BRIDGE, nfe=3).sample(scans_for(0), 4).masks.shape == (0, 4, 16, 16)


def test_bad_input_is_named():
    net = ToyNet().eval()
    sampler = Sampler(net, BRIDGE, nfe=3)
    with pytest.raises(ValueError, match=r"scans must be \(S, C, H, W\)"):
        sampler.sample(torch.zeros(1, 16, 16), 2)
    bad = scans_for(1)
    bad[0, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        sampler.sample(bad, 2)
    with pytest.raises(TypeError, match="floating point"):
        sampler.sample(torch.zeros(1, 1, 8, 8, dtype=torch.uint8), 2)
    with pytest.raises(ValueError, match="case_ids has 2 entries for 1 scans"):
        sampler.sample(scans_for(1), 2, case_ids=["a", "b"])
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\)"):
        sampler.sample(scans_for(1), 2, labels=torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="nfe"):
        Sampler(net, BRIDGE, nfe=0)
    with pytest.raises(ValueError, match="max_batch"):
        Sampler(net, BRIDGE, nfe=3, max_batch=0)


class DropoutNet(ToyNet):
    """ToyNet with heavy dropout: any live dropout changes the masks."""

    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.5)

    def forward(self, x, t, label):
        return self.drop(super().forward(x, t, label))


def test_dropout_is_never_live_and_the_mode_is_restored():
    net = DropoutNet().train()
    scans = scans_for(1, seed=3)
    got = Sampler(net, BRIDGE, nfe=4).sample(scans, 6, return_soft=True)
    assert net.training, "the caller's module is back in training mode after sampling"
    want = Sampler(net.eval(), BRIDGE, nfe=4).sample(scans, 6, return_soft=True)
    assert torch.equal(got.soft, want.soft)


class FailingNet(nn.Module):
    """Wraps a net and raises CUDA out-of-memory on the chosen calls, the way an allocator would."""

    def __init__(self, net, fail_on, batch_over=0):
        super().__init__()
        self.net, self.fail_on, self.batch_over, self.calls = net, set(fail_on), batch_over, 0
        self.null_label = net.null_label

    def forward(self, x, t, label):
        self.calls += 1
        if self.calls in self.fail_on or (self.batch_over and x.shape[0] > self.batch_over):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return self.net(x, t, label)


@pytest.mark.parametrize("fail_on,batch_over", [((1,), 0), ((3,), 0), ((2, 7), 0), ((), 20)])
def test_out_of_memory_halves_the_chunk_and_keeps_the_masks(fail_on, batch_over):
    """Injected OOM at the first step, mid-chunk, twice, or for every chunk above 20 rows: the sampler
    halves its chunk, retries, reports the size it used, and the masks are the same bit for bit."""
    net = ToyNet().eval()
    scans = scans_for(2, seed=4)
    want = Sampler(net, BRIDGE, nfe=4, guidance=1.5, max_batch=16).sample(scans, 9, return_soft=True)
    failing = FailingNet(net, fail_on, batch_over)
    sampler = Sampler(failing, BRIDGE, nfe=4, guidance=1.5, max_batch=16)
    got = sampler.sample(scans, 9, return_soft=True)
    assert torch.equal(got.masks, want.masks)
    assert torch.equal(got.soft, want.soft)
    retries = got.stats["oom_retries"]
    assert retries == (len(fail_on) if fail_on else 1)
    assert got.stats["final_batch"] == 16 // 2**retries == sampler.max_batch


def test_out_of_memory_at_one_mask_and_other_errors_propagate():
    net = ToyNet().eval()
    with pytest.raises(torch.cuda.OutOfMemoryError):
        Sampler(FailingNet(net, (), batch_over=0.5), BRIDGE, nfe=3, max_batch=4).sample(scans_for(1), 2)

    class Broken(ToyNet):
        def forward(self, x, t, label):
            raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        Sampler(Broken(), BRIDGE, nfe=3).sample(scans_for(1), 2)
    from ssb_fast.step_runner import is_out_of_memory
    assert is_out_of_memory(RuntimeError("CUDA error: out of memory (during graph capture)"))
    assert not is_out_of_memory(ValueError("out of range"))


def test_micro_batches_give_the_same_masks_and_split_the_calls():
    """On the CPU the network runs a few rows per call (cache-sized); the masks do not change."""
    net = ToyNet().eval()
    scans = scans_for(2, seed=6)
    calls = []
    net.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    whole = Sampler(net, BRIDGE, nfe=3, guidance=1.5, max_batch=64, micro_batch=1000).sample(scans, 12,
                                                                                            return_soft=True)
    whole_calls, calls[:] = list(calls), []
    split = Sampler(net, BRIDGE, nfe=3, guidance=1.5, max_batch=64, micro_batch=7).sample(scans, 12,
                                                                                         return_soft=True)
    assert max(calls) == 7 and len(calls) > len(whole_calls) and sum(calls) == sum(whole_calls)
    assert torch.equal(split.masks, whole.masks) and torch.equal(split.soft, whole.soft)
    assert Sampler(net, BRIDGE, nfe=3).runner.micro_batch == 32  # the CPU default
    with pytest.raises(ValueError, match="micro_batch"):
        Sampler(net, BRIDGE, nfe=3, micro_batch=0)
