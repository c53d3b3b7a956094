"""Validation during training: a protocol that can choose a checkpoint.

A fixed subset of the validation split, spread evenly over it (never its first scans, which come from
the same few patients), sampled with the EMA model at a low NFE. Each validation reports the mean and
standard error over scans of GED, D_max, CI and HM-IoU, the rate of empty samples, and the ratio of the
model's GED to the no-diversity reference (N copies of the readers' majority) with a bootstrap interval
over scans. The references are computed once per run on the same scans and logged beside.
"""

from __future__ import annotations

import torch

from ssb_fast.bridge import Bridge
from ssb_fast.references import (
    bootstrap_ratio,
    empty_rate,
    no_diversity,
    reader_draws,
    reader_empty_rate,
    score_sets,
    spread_cases,
    summarise,
)
from ssb_fast.sampler import Sampler

VALIDATION_KEYS = ("ged", "d_max", "ci", "hm_iou")


def validation_cases(dataset, n_scans: int) -> list[int]:
    """n scans spread evenly over the split, a fixed set so that curves are comparable over a run."""
    if n_scans < 1 or len(dataset) == 0:
        return []
    return spread_cases(len(dataset), n_scans)


def _batch(dataset, n_scans: int):
    idx = validation_cases(dataset, n_scans)
    items = [dataset[i] for i in idx]
    if not items:
        return None
    return (torch.stack([it["image"] for it in items]), torch.stack([it["masks"] for it in items]),
            torch.stack([it["present"] for it in items]), [it["case_id"] for it in items])


def validation_references(dataset, n_scans: int = 64, n_samples: int = 16, seed: int = 0) -> dict:
    """The no-diversity and readers references on the validation scans: means, standard errors, the
    per-scan no-diversity GED (for ratios) and the readers' empty-mask rate."""
    batch = _batch(dataset, n_scans)
    if batch is None:
        return {}
    _, experts, present, case_ids = batch
    flat = no_diversity(experts, present, n_samples)
    draws = reader_draws(experts, present, n_samples, seed, case_ids)
    nodiv = score_sets(flat, experts, present, VALIDATION_KEYS)
    readers = score_sets(draws, experts, present, VALIDATION_KEYS)
    return {"n_scans": len(case_ids), "n_samples": n_samples, **summarise(nodiv, "no_diversity_"),
            **summarise(readers, "readers_"), "readers_empty_rate": reader_empty_rate(experts, present),
            "no_diversity_ged_per_scan": nodiv["ged"].tolist()}


@torch.no_grad()
def validate(model, bridge: Bridge, dataset, n_scans: int = 64, n_samples: int = 16, nfe: int = 10,
             guidance: float = 1.0, seed: int = 0, device: torch.device | str = "cpu",
             references: dict | None = None) -> dict:
    """Scores of `n_samples` masks per validation scan: means and standard errors over scans, the
    empty-sample rate and, given `references`, the GED ratio to no diversity with a 95% interval."""
    batch = _batch(dataset, n_scans)
    if batch is None:
        return {}
    scans, experts, present, case_ids = batch
    sampler = Sampler(model, bridge, nfe=nfe, guidance=guidance, seed=seed, device=device)
    result = sampler.sample(scans, n_samples, case_ids=case_ids)
    per_scan = score_sets(result.masks, experts, present, VALIDATION_KEYS)
    out = summarise(per_scan)
    out.update(n_scans=len(case_ids), n_samples=n_samples, nfe=nfe, empty_rate=empty_rate(result.masks),
               masks_per_s=result.stats["masks_per_s"])
    ref = (references or {}).get("no_diversity_ged_per_scan")
    if ref is not None and len(ref) == len(case_ids):
        ratio, low, high = bootstrap_ratio(per_scan["ged"], ref, seed=seed)
        out.update(ged_ratio_to_no_diversity=ratio, ged_ratio_low=low, ged_ratio_high=high)
    return out
