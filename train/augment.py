"""Training-time augmentation of a batch: the eight flips and quarter turns and a shift (image and masks
together), and intensity, contrast, gamma, blur and noise on the image alone.

The semi-synthetic `lidc-contours` images share the readers' shapes with real CT but not its pixels; a model
trained on them alone outlines whatever is brightest in a real crop (vessels). Perturbing contrast,
sharpness and noise keeps it from relying on the generator's exact intensities; and since every
`lidc-contours` crop is centred on its nodule while real crops are not, half of the items are shifted
(reflecting the image at the border) so that the model looks for the nodule rather than at the centre.
Every random choice comes from the step's generator (drawn on the CPU), so a resumed run stays bit-exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Ranges of the per-item draws (images live in [-1, 1]).
CONTRAST = (0.75, 1.3)     # multiplies the image about its mean
BRIGHTNESS = 0.1           # +- shift
GAMMA = (0.7, 1.4)         # on the image mapped to [0, 1]
P_BLUR, BLUR_SIGMA = 0.3, (0.4, 1.2)  # Gaussian blur in pixels, with this probability
NOISE_STD = 0.06           # additive Gaussian noise up to this std, half of the items
P_SHIFT, MAX_SHIFT = 0.5, 0.3  # shift half of the items by up to 30% of the side


@dataclass
class AugmentDraw:
    turns: torch.Tensor       # (B,) quarter turns 0..3
    flip: torch.Tensor        # (B,) bool, mirror the columns first
    contrast: torch.Tensor    # (B,)
    brightness: torch.Tensor  # (B,)
    gamma: torch.Tensor       # (B,)
    blur_sigma: torch.Tensor  # (B,) 0 = no blur
    noise: torch.Tensor       # (B, 1, H, W) already scaled
    shift: torch.Tensor | None = None  # (B, 2) int rows, cols; None = no shift


def draw_augment(batch: int, size: tuple[int, int], generator: torch.Generator) -> AugmentDraw:
    def uniform(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(batch, generator=generator)

    turns = torch.randint(0, 4, (batch,), generator=generator)
    flip = torch.rand(batch, generator=generator) < 0.5
    contrast = uniform(*CONTRAST)
    brightness = uniform(-BRIGHTNESS, BRIGHTNESS)
    gamma = torch.exp(uniform(*(float(torch.log(torch.tensor(g))) for g in GAMMA)))
    blur_sigma = torch.where(torch.rand(batch, generator=generator) < P_BLUR, uniform(*BLUR_SIGMA),
                             torch.zeros(batch))
    noise_std = torch.where(torch.rand(batch, generator=generator) < 0.5, uniform(0.0, NOISE_STD),
                            torch.zeros(batch))
    noise = torch.randn(batch, 1, *size, generator=generator) * noise_std.view(-1, 1, 1, 1)
    reach = int(MAX_SHIFT * min(size))
    shift = torch.randint(-reach, reach + 1, (batch, 2), generator=generator)
    shift = shift * (torch.rand(batch, generator=generator) < P_SHIFT).view(-1, 1)
    return AugmentDraw(turns, flip, contrast, brightness, gamma, blur_sigma, noise, shift)


def _shift(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Each item moved by its (rows, cols), the border reflected in (a shift beyond the side is clipped)."""
    h, w = x.shape[-2:]
    reach = int(shift.abs().max()) if shift.numel() else 0
    reach = min(reach, h - 1, w - 1)
    if reach == 0:
        return x
    padded = F.pad(x.float(), (reach, reach, reach, reach), mode="reflect").to(x.dtype)
    out = torch.empty_like(x)
    for i, (dr, dc) in enumerate(shift.clamp(-reach, reach).tolist()):
        out[i] = padded[i, :, reach - dr: reach - dr + h, reach - dc: reach - dc + w]
    return out


def _dihedral(x: torch.Tensor, turns: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Each item flipped (columns) and turned by its own quarter turns; square images only."""
    out = torch.where(flip.to(x.device).view(-1, *([1] * (x.dim() - 1))), x.flip(-1), x)
    rotated = [torch.rot90(out, k, dims=(-2, -1)) for k in range(4)]
    pick = turns.to(x.device).view(-1, *([1] * (x.dim() - 1)))
    result = rotated[0]
    for k in range(1, 4):
        result = torch.where(pick == k, rotated[k], result)
    return result


def _gaussian_blur(images: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-item separable Gaussian blur (radius 3 px, reflect padding); sigma 0 leaves an item unchanged."""
    radius = 3
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    s = sigma.clamp_min(1e-3).view(-1, 1)
    kernel = torch.exp(-0.5 * (offsets.view(1, -1) / s) ** 2)
    kernel = kernel / kernel.sum(1, keepdim=True)
    kernel = torch.where(sigma.view(-1, 1) > 0, kernel, (offsets == 0).float().expand_as(kernel))
    b, c, h, w = images.shape
    kernel = kernel.to(images.device, images.dtype).repeat_interleave(c, 0)  # (B*C, 2r+1)
    x = images.reshape(1, b * c, h, w)
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), kernel.view(b * c, 1, 1, -1), groups=b * c)
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), kernel.view(b * c, 1, -1, 1), groups=b * c)
    return x.reshape(b, c, h, w)


def augment(images: torch.Tensor, masks: torch.Tensor, aug: AugmentDraw) -> tuple[torch.Tensor, torch.Tensor]:
    """images (B, C, H, W) in [-1, 1], masks (B, M, H, W): the augmented pair (images still in [-1, 1])."""
    if images.shape[-1] != images.shape[-2]:
        raise ValueError(f"augmentation turns images by quarter turns; needs square images, got "
                         f"{tuple(images.shape[-2:])}")
    images = _dihedral(images.float(), aug.turns, aug.flip)
    masks = _dihedral(masks, aug.turns, aug.flip)
    if aug.shift is not None:
        images, masks = _shift(images, aug.shift), _shift(masks, aug.shift)
    dev = images.device
    unit = ((images + 1) / 2).clamp(0, 1) ** aug.gamma.to(dev).view(-1, 1, 1, 1)
    images = unit * 2 - 1
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    images = (images - mean) * aug.contrast.to(dev).view(-1, 1, 1, 1) + mean + aug.brightness.to(dev).view(-1, 1, 1, 1)
    images = _gaussian_blur(images, aug.blur_sigma)
    images = images + aug.noise.to(dev)
    return images.clamp(-1, 1), masks
