"""Training augmentation: image and masks move together, intensities stay in range, the draw is a pure
function of the generator, and an augmented run resumes bit for bit."""

from __future__ import annotations

import torch
from ssb_fast.train.augment import AugmentDraw, augment, draw_augment
from ssb_fast.train.loop import TrainConfig, train

from ssb_fast import load_model
from ssb_fast.data import write_synthetic


def _plain(batch: int, turns, flip, size: int = 8) -> AugmentDraw:
    """Geometry only: no intensity change at all."""
    return AugmentDraw(torch.tensor(turns), torch.tensor(flip), torch.ones(batch), torch.zeros(batch),
                       torch.ones(batch), torch.zeros(batch), torch.zeros(batch, 1, size, size))


def test_geometry_moves_image_and_masks_together():
    g = torch.Generator().manual_seed(1)
    masks = (torch.rand(4, 3, 8, 8, generator=g) > 0.6).to(torch.uint8)
    images = masks[:, :1].float() * 2 - 1  # the image is the first mask, so they must still agree afterwards
    aug = _plain(4, [0, 1, 2, 3], [False, True, False, True])
    out_images, out_masks = augment(images, masks, aug)
    assert out_masks.dtype == torch.uint8
    torch.testing.assert_close(out_images, out_masks[:, :1].float() * 2 - 1)
    torch.testing.assert_close(out_masks[0], masks[0])  # no turn, no flip
    torch.testing.assert_close(out_masks[1], torch.rot90(masks[1].flip(-1), 1, dims=(-2, -1)))
    torch.testing.assert_close(out_masks[2], torch.rot90(masks[2], 2, dims=(-2, -1)))
    assert not torch.equal(out_masks[3], masks[3])


def test_shift_moves_image_and_masks_together_by_the_drawn_offset():
    masks = torch.zeros(2, 2, 16, 16, dtype=torch.uint8)
    masks[:, :, 6:9, 7:10] = 1
    images = masks[:, :1].float() * 2 - 1
    aug = _plain(2, [0, 0], [False, False], size=16)
    aug.shift = torch.tensor([[3, -2], [0, 0]])
    out_images, out_masks = augment(images, masks, aug)
    torch.testing.assert_close(out_masks[0], torch.roll(masks[0], (3, -2), dims=(-2, -1)))  # far from the border
    torch.testing.assert_close(out_masks[1], masks[1])
    torch.testing.assert_close(out_images, out_masks[:, :1].float() * 2 - 1)


def test_intensity_changes_stay_in_range_and_blur_smooths():
    g = torch.Generator().manual_seed(2)
    images = torch.rand(64, 1, 16, 16, generator=g) * 2 - 1
    masks = torch.zeros(64, 4, 16, 16, dtype=torch.uint8)
    aug = draw_augment(64, (16, 16), g)
    out, _ = augment(images, masks, aug)
    assert out.min() >= -1 and out.max() <= 1 and not torch.equal(out, images)
    blurred = _plain(64, [0] * 64, [False] * 64, size=16)
    blurred.blur_sigma = torch.full((64,), 1.0)
    smooth, _ = augment(images, masks, blurred)
    # A blur keeps the mean (reflect padding: nearly) and lowers the pixel-to-pixel variation.
    assert (smooth.diff(dim=-1).abs().mean() < 0.6 * images.diff(dim=-1).abs().mean())
    torch.testing.assert_close(smooth.mean(), images.mean(), atol=0.02, rtol=0)


def test_draw_is_a_function_of_the_generator():
    a = draw_augment(8, (16, 16), torch.Generator().manual_seed(5))
    b = draw_augment(8, (16, 16), torch.Generator().manual_seed(5))
    assert all(torch.equal(getattr(a, k), getattr(b, k)) for k in a.__dataclass_fields__)
    assert {0, 1, 2, 3} >= set(a.turns.tolist()) and (a.blur_sigma >= 0).all()


def test_an_augmented_run_resumes_bit_for_bit(tmp_path):
    data = write_synthetic(tmp_path / "synthetic", n_cases=24, size=32, seed=0)
    base = dict(data=str(data), preset="tiny", batch_size=4, lr=2e-3, warmup_steps=2, log_every=4,
                save_every=4, val_every=0, seed=3, device="cpu", augment=True, lr_schedule="constant")
    train(TrainConfig(out=str(tmp_path / "straight"), steps=8, **base), progress=False)
    train(TrainConfig(out=str(tmp_path / "split"), steps=4, **base), progress=False)
    train(TrainConfig(out=str(tmp_path / "split"), steps=8, **base), progress=False, resume=True)
    plain = train(TrainConfig(out=str(tmp_path / "plain"), steps=8, **{**base, "augment": False}), progress=False)
    a = load_model(tmp_path / "straight" / "model.safetensors", weights="model").state_dict()
    b = load_model(tmp_path / "split" / "model.safetensors", weights="model").state_dict()
    c = load_model(tmp_path / "plain" / "model.safetensors", weights="model").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a) and plain.step == 8
