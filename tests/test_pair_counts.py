"""`pair_counts`: the Triton launcher against the PyTorch reference, exactness, and the op's registration."""

from __future__ import annotations

import pytest
import torch
from _helpers import non_contiguous
from ssb_fast.kernels.pair_counts import FLUSH_PIXELS, bytes_moved, flops, pair_counts_ref, pair_counts_triton

# (B, K, P): odd K and P, a single mask, single pixels, K above one 64-row tile, an empty batch.
SHAPES = [(0, 3, 5), (1, 1, 1), (2, 5, 37), (3, 19, 1001), (1, 70, 333), (2, 33, 4099), (2, 4, 0)]
MASK_DTYPES = [torch.bool, torch.uint8, torch.float32, torch.float16, torch.bfloat16]


def random_masks(batch, k, pixels, dtype=torch.uint8, seed=0, density=0.4):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(batch, k, pixels, generator=g) < density).to(dtype)


def test_reference_on_hand_counted_masks():
    # 3x3 masks, flattened: top row, left column, the centre, and an empty mask.
    top = torch.tensor([1, 1, 1, 0, 0, 0, 0, 0, 0])
    left = torch.tensor([1, 0, 0, 1, 0, 0, 1, 0, 0])
    centre = torch.tensor([0, 0, 0, 0, 1, 0, 0, 0, 0])
    empty = torch.zeros(9, dtype=torch.int64)
    masks = torch.stack([top, left, centre, empty])[None].to(torch.uint8)
    want = torch.tensor([[[3, 1, 0, 0], [1, 3, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]]])
    got = pair_counts_ref(masks)
    assert got.dtype == torch.int64
    assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", MASK_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_triton_matches_reference_exactly(shape, dtype, triton_device):
    masks = random_masks(*shape, dtype=dtype, seed=sum(shape)).to(triton_device)
    got = pair_counts_triton(masks).cpu()
    want = pair_counts_ref(masks.cpu())
    assert got.shape == (shape[0], shape[1], shape[1]) and got.dtype == torch.int64
    assert torch.equal(got, want), f"max |diff| {(got - want).abs().max()}"


def test_triton_is_symmetric_with_sizes_on_the_diagonal(triton_device):
    masks = random_masks(3, 41, 517, seed=5).to(triton_device)
    got = pair_counts_triton(masks).cpu()
    assert torch.equal(got, got.transpose(1, 2))
    assert torch.equal(torch.diagonal(got, dim1=1, dim2=2), masks.cpu().sum(-1).to(torch.int64))


@pytest.mark.parametrize("dtype", [torch.bool, torch.float32])
def test_triton_non_contiguous_input(dtype, triton_device):
    base = random_masks(2, 23, 301, dtype=dtype, seed=3).to(triton_device)
    strided = non_contiguous(base)  # a pixel stride of 2
    rows = random_masks(2, 46, 301, dtype=dtype, seed=4).to(triton_device)[:, ::2]  # a row stride gap
    for masks in (strided, rows):
        assert not masks.is_contiguous()
        assert torch.equal(pair_counts_triton(masks).cpu(), pair_counts_ref(masks.cpu().contiguous()))


def test_triton_flush_path_matches_reference(triton_device):
    # A flush every 2 blocks of 16 pixels exercises the fp32 -> int64 hand-over on a small input.
    masks = random_masks(2, 17, 1000, seed=7).to(triton_device)
    got = pair_counts_triton(masks, block_p=16, flush_pixels=32).cpu()
    assert torch.equal(got, pair_counts_ref(masks.cpu()))


def test_reference_is_exact_past_two_to_the_24():
    # 2**24 + 3 is not a float32 (spacing 2 there): a single fp32 sum would round it.
    pixels = FLUSH_PIXELS + 3
    masks = torch.ones(1, 2, pixels, dtype=torch.uint8)
    masks[0, 1, ::2] = 0  # ones at odd positions: (2**24 + 3) // 2 of them
    got = pair_counts_ref(masks)
    half = pixels // 2
    assert torch.equal(got, torch.tensor([[[pixels, half], [half, half]]]))


@pytest.mark.slow
def test_triton_is_exact_past_two_to_the_24(triton_device):
    pixels = FLUSH_PIXELS + 5
    masks = torch.ones(1, 3, pixels, dtype=torch.uint8)
    masks[0, 2, ::2] = 0
    half = pixels // 2
    got = pair_counts_triton(masks.to(triton_device), block_p=2**16).cpu()  # interpreter tiles <= 2**20
    want = torch.tensor([[[pixels, pixels, half], [pixels, pixels, half], [half, half, half]]])
    assert torch.equal(got, want)


def test_bad_arguments_are_named():
    with pytest.raises(TypeError, match="masks must have dtype bool, uint8"):
        pair_counts_ref(torch.zeros(1, 2, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"masks must be \(B, K, P\).*\(2, 3\)"):
        pair_counts_ref(torch.zeros(2, 3, dtype=torch.uint8))
    with pytest.raises(TypeError, match="masks must be a torch.Tensor"):
        pair_counts_ref([[0, 1]])


def test_launcher_rejects_bad_blocks(triton_device):
    masks = random_masks(1, 3, 64).to(triton_device)
    with pytest.raises(ValueError, match="block_p must be a power of two"):
        pair_counts_triton(masks, block_p=24)
    with pytest.raises(ValueError, match="flush_pixels must be a multiple"):
        pair_counts_triton(masks, block_p=16, flush_pixels=40)


def gram_iou(x):
    g = torch.ops.ssb_fast.pair_counts(x).double()
    sizes = torch.diagonal(g, dim1=1, dim2=2)
    return g / (sizes[:, :, None] + sizes[:, None, :] - g).clamp_min(1)


def test_op_dispatches_to_reference_on_cpu_and_traces_without_breaks():
    masks = random_masks(2, 7, 99, seed=11)
    assert torch.equal(torch.ops.ssb_fast.pair_counts(masks), pair_counts_ref(masks))
    torch.library.opcheck(torch.ops.ssb_fast.pair_counts.default, (masks,))
    torch._dynamo.reset()
    explained = torch._dynamo.explain(gram_iou)(masks)
    assert explained.graph_break_count == 0 and explained.graph_count == 1


@pytest.mark.slow
def test_compiled_fullgraph_matches_eager():
    masks = random_masks(2, 7, 99, seed=12)
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(gram_iou, fullgraph=True)(masks), gram_iou(masks))


def test_cost_model():
    assert bytes_moved(2, 3, 100) == 2 * 3 * 100 + 2 * 9 * 8
    assert bytes_moved(1, 2, 10, torch.float32) == 80 + 32
    assert flops(2, 3, 100) == 2 * 2 * 9 * 100


@pytest.mark.gpu
def test_cuda_dispatch_runs_triton():
    masks = random_masks(4, 261, 16384, seed=2).cuda()
    assert torch.equal(torch.ops.ssb_fast.pair_counts(masks).cpu(), pair_counts_ref(masks.cpu()))
