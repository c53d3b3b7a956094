"""`pairwise_jsd`: the Triton launcher against the PyTorch reference, hand values, the op's registration."""

from __future__ import annotations

import math

import pytest
import torch
from _helpers import assert_close_report, non_contiguous
from ssb_fast.kernels.pairwise_jsd import bytes_moved, flops, pairwise_jsd_ref, pairwise_jsd_triton

# (B, R, L): odd rows and outcomes, one outcome, one row, rows above one tile, an empty batch.
SHAPES = [(0, 3, 5), (1, 1, 7), (2, 5, 37), (3, 19, 3), (2, 33, 1), (1, 70, 301), (2, 257, 4)]


def random_dists(batch, rows, outcomes, dtype=torch.float32, seed=0, zeros=0.3):
    """Random distributions with exact zeros (0 log 0 terms) and some one-hot rows."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, rows, outcomes, generator=g)
    x[x < zeros] = 0
    if rows > 2 and outcomes > 0:
        x[:, 1] = 0
        x[:, 1, 0] = 1
    x[x.sum(-1) == 0] = 1.0
    return (x / x.sum(-1, keepdim=True)).to(dtype)


def js_by_definition(p: list[float], q: list[float]) -> float:
    """JS base 2 written out term by term, 0 log 0 = 0."""
    total = 0.0
    for a, b in zip(p, q, strict=True):
        m = (a + b) / 2
        total += (a * math.log2(a / m) if a else 0.0) + (b * math.log2(b / m) if b else 0.0)
    return total / 2


def test_reference_hand_values():
    p, q = [1.0, 0.0], [0.5, 0.5]
    # KL(P||M) = log2(4/3); KL(Q||M) = (log2(2/3) + 1)/2; JS is their mean.
    want_pq = 0.5 * math.log2(4 / 3) + 0.25 * (math.log2(2 / 3) + 1)
    assert js_by_definition(p, q) == pytest.approx(want_pq, abs=1e-15)
    dists = torch.tensor([[p, q, [0.0, 1.0], [0.25, 0.75]]])
    got = pairwise_jsd_ref(dists)
    assert got.dtype == torch.float32 and got.shape == (1, 4, 4)
    assert got[0, 0, 1].item() == pytest.approx(want_pq, abs=1e-7)
    assert got[0, 0, 2].item() == 1.0  # disjoint supports: the maximum
    rows = dists[0].tolist()
    for i in range(4):
        for k in range(4):
            assert got[0, i, k].item() == pytest.approx(js_by_definition(rows[i], rows[k]), abs=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_triton_matches_reference(shape, dtype, triton_device):
    dists = random_dists(*shape, dtype=dtype, seed=sum(shape)).to(triton_device)
    got = pairwise_jsd_triton(dists).cpu()
    want = pairwise_jsd_ref(dists.cpu())  # the same rounded inputs: only the fp32 arithmetic differs
    assert got.dtype == torch.float32 and got.shape == (shape[0], shape[1], shape[1])
    assert_close_report(got, want, 2e-6, 1e-5, f"pairwise_jsd {shape} {dtype}")


def test_triton_symmetric_zero_diagonal_and_bounded(triton_device):
    dists = random_dists(3, 45, 29, seed=9).to(triton_device)
    got = pairwise_jsd_triton(dists).cpu()
    assert torch.equal(got, got.transpose(1, 2))
    assert torch.equal(torch.diagonal(got, dim1=1, dim2=2), torch.zeros(3, 45))
    assert got.min() >= 0 and got.max() <= 1


def test_triton_non_contiguous_input(triton_device):
    dists = non_contiguous(random_dists(2, 21, 13, seed=4)).to(triton_device)
    rows = random_dists(2, 42, 13, seed=5).to(triton_device)[:, ::2]
    for d in (dists, rows):
        assert not d.is_contiguous()
        want = pairwise_jsd_ref(d.cpu().contiguous())
        assert_close_report(pairwise_jsd_triton(d).cpu(), want, 2e-6, 1e-5, "strided")


def test_identical_rows_give_zero_and_one_outcome_gives_zero():
    dists = random_dists(1, 3, 6, seed=1)
    twice = torch.cat([dists, dists], dim=1)
    got = pairwise_jsd_ref(twice)[0]
    assert torch.equal(got[:3, 3:].diagonal(), torch.zeros(3))
    assert torch.equal(pairwise_jsd_ref(torch.ones(2, 5, 1)), torch.zeros(2, 5, 5))


def test_bad_arguments_are_named():
    with pytest.raises(TypeError, match="dists must have dtype float32"):
        pairwise_jsd_ref(torch.zeros(1, 2, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"dists must be \(B, R, L\).*\(4, 3\)"):
        pairwise_jsd_ref(torch.zeros(4, 3))


def test_op_dispatches_to_reference_on_cpu_and_passes_opcheck():
    dists = random_dists(2, 6, 5, seed=3)
    assert torch.equal(torch.ops.ssb_fast.pairwise_jsd(dists), pairwise_jsd_ref(dists))
    torch.library.opcheck(torch.ops.ssb_fast.pairwise_jsd.default, (dists,))

    def mean_js(d):
        return torch.ops.ssb_fast.pairwise_jsd(d).mean(dim=(1, 2))

    torch._dynamo.reset()
    assert torch._dynamo.explain(mean_js)(dists).graph_break_count == 0


def test_cost_model():
    assert bytes_moved(2, 3, 5) == 2 * 3 * 5 * 4 + 2 * 9 * 4
    assert flops(1, 4, 10) == 12 * 16 * 10


@pytest.mark.gpu
def test_cuda_dispatch_runs_triton():
    dists = random_dists(8, 256, 4, seed=6).cuda()
    got = torch.ops.ssb_fast.pairwise_jsd(dists).cpu()
    assert_close_report(got, pairwise_jsd_ref(dists.cpu()), 2e-6, 1e-5, "cuda")
