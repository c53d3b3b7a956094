"""The SSB training loss: I2SB regression on the bridge label plus a soft-Dice term on the predicted mask.

    L = mean ||out - label||^2 + lambda_dice * (1 - softDice(p̂, y)),   p̂ = clamp((x0̂ + 1) / 2, 0, 1)

Each item draws one present annotator uniformly as its x0; its expert label is the annotator's slot
(`expert_labels="slot"`, for readers who keep their identity across cases) or the rank of its mask by area
among the item's present masks (`"area-rank"`: 0 = the largest, empty masks last; for anonymous readers,
as LIDC-IDRI's); `resolve_expert_labels` chooses for `"auto"`. With probability p_uncond the label becomes
the null label (the unconditional model that classifier-free guidance needs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ssb_fast.bridge import Bridge
from ssb_fast.references import present_areas


@dataclass
class TrainingDraw:
    """Everything random about one training batch, drawn from one generator (so a step is reproducible)."""

    annotator: torch.Tensor  # (B,) index of the mask used as x0
    label: torch.Tensor      # (B,) expert label fed to the network (annotator, or null)
    t: torch.Tensor          # (B,) bridge timestep
    seeds: torch.Tensor      # (B,) Philox keys for the in-kernel noise


@dataclass
class LossParts:
    loss: torch.Tensor
    mse: torch.Tensor
    dice_loss: torch.Tensor


def draw(present: torch.Tensor, null_label: int, n_timesteps: int, p_uncond: float,
         generator: torch.Generator) -> TrainingDraw:
    """Draw annotators among the present ones, CFG label dropout, timesteps and noise keys (on CPU)."""
    present = present.to("cpu", torch.bool)
    if present.dim() != 2:
        raise ValueError(f"present must be (B, M_max); got shape {tuple(present.shape)}")
    empty = (~present.any(1)).nonzero().flatten()
    if empty.numel():
        raise ValueError(f"batch items {empty.tolist()[:5]} have no present annotator")
    batch = present.shape[0]
    annotator = torch.multinomial(present.float(), 1, generator=generator).flatten()
    drop = torch.rand(batch, generator=generator) < p_uncond
    label = torch.where(drop, torch.full_like(annotator, null_label), annotator)
    t = torch.randint(0, n_timesteps, (batch,), generator=generator)
    seeds = torch.randint(0, 2**62, (batch,), generator=generator)
    return TrainingDraw(annotator, label, t, seeds)


EXPERT_LABELS = ("auto", "area-rank", "slot")


def resolve_expert_labels(choice: str, meta: dict | None) -> str:
    """`auto`: `slot` when the dataset says its reader k is the same annotator in every case (its meta names
    the annotators' styles, as the synthetic data does), else `area-rank` (LIDC-IDRI's readers are anonymous
    per nodule, as are those of every imported LIDC layout)."""
    if choice != "auto":
        return choice
    return "slot" if (meta or {}).get("annotator_styles") else "area-rank"


def area_ranks(masks: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """(B, M_max) int64: the rank of each reader mask by area among its item's present masks, 0 = the largest.

    Absent slots rank after every present one; ties (empty masks above all) keep the slot order.
    """
    order = torch.sort(present_areas(masks.cpu(), present.cpu()), dim=1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(order.shape[1]).expand_as(order).contiguous())
    return ranks


def with_area_rank_labels(sample: TrainingDraw, ranks: torch.Tensor, null_label: int) -> TrainingDraw:
    """`sample` with each non-null label replaced by the area rank of the drawn annotator's mask; `ranks` is
    `area_ranks` of the batch's items (B, M_max), on the CPU like the draw.

    LIDC-IDRI's readers are anonymous per nodule, so a slot carries no reader's style; the rank does carry
    something the readers differ in (label 0 = the widest reading, the last = the narrowest, often empty).
    Sampling with the labels cycled then draws every rank equally often, as the readers' masks do.
    """
    rank = ranks.gather(1, sample.annotator.view(-1, 1)).flatten()
    label = torch.where(sample.label == null_label, sample.label, rank)
    return TrainingDraw(sample.annotator, label, sample.t, sample.seeds)


def soft_dice(prob: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Per-item soft Dice (2 Σpy + s) / (Σp + Σy + s); the smoothing s keeps empty targets defined (= 1 if p = 0)."""
    dims = tuple(range(1, prob.dim()))
    inter = (prob * target).sum(dims)
    return (2 * inter + smooth) / (prob.sum(dims) + target.sum(dims) + smooth)


def ssb_loss(net, bridge: Bridge, images: torch.Tensor, masks: torch.Tensor, sample: TrainingDraw,
             lambda_dice: float = 0.1) -> LossParts:
    """Loss of one batch. images (B, C, H, W) in [-1, 1]; masks (B, M_max, H, W) in {0, 1}."""
    device = images.device
    batch = images.shape[0]
    annotator = sample.annotator.to(device, non_blocking=True)
    x0 = masks[torch.arange(batch, device=device), annotator].unsqueeze(1).float() * 2 - 1
    x1 = images[:, :1].float()
    x_t, target = bridge.bridge_sample(sample.t, x0, x1, sample.seeds)  # t range-checked on the CPU, as drawn
    t = sample.t.to(device, non_blocking=True)
    out = net(torch.cat([x_t, images.float()], dim=1), bridge.time_input(t), sample.label.to(device)).float()
    mse = F.mse_loss(out, target)
    x0_hat = x_t - bridge.on("std_fwd", device)[t].view(-1, 1, 1, 1) * out
    prob = ((x0_hat + 1) / 2).clamp(0, 1)
    dice_loss = 1 - soft_dice(prob, (x0 + 1) / 2).mean()
    return LossParts(mse + lambda_dice * dice_loss, mse.detach(), dice_loss.detach())
