"""Validation during training: sample a few masks per validation scan with the EMA model, score them."""

from __future__ import annotations

import torch

from ssb_fast.bridge import Bridge
from ssb_fast.metrics import evaluate
from ssb_fast.sampler import Sampler

VALIDATION_KEYS = ("ged", "d_max", "ci", "hm_iou")


def validation_cases(dataset, n_scans: int) -> list[int]:
    """The first n scans of the split, a fixed set so that curves are comparable over a run."""
    return list(range(min(n_scans, len(dataset))))


@torch.no_grad()
def validate(model, bridge: Bridge, dataset, n_scans: int = 8, n_samples: int = 8, nfe: int = 10,
             guidance: float = 1.0, seed: int = 0, device: torch.device | str = "cpu") -> dict:
    """GED, D_max, CI and HM-IoU (means over scans) of `n_samples` masks per scan at low NFE."""
    items = [dataset[i] for i in validation_cases(dataset, n_scans)]
    if not items:
        return {}
    scans = torch.stack([it["image"] for it in items])
    experts = torch.stack([it["masks"] for it in items])
    present = torch.stack([it["present"] for it in items])
    sampler = Sampler(model, bridge, nfe=nfe, guidance=guidance, seed=seed, device=device)
    result = sampler.sample(scans, n_samples, case_ids=[it["case_id"] for it in items])
    scores = evaluate(result.masks, experts, present=present)
    out = {key: float(torch.as_tensor(scores[key], dtype=torch.float64).mean()) for key in VALIDATION_KEYS}
    out.update(n_scans=len(items), n_samples=n_samples, nfe=nfe, masks_per_s=result.stats["masks_per_s"])
    return out
