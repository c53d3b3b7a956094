"""What a sampler's scores mean: reference mask sets scored like a model, and statistics over cases.

A GED of 0.2 says nothing on its own: LIDC nodules on which the readers agree score low whatever the
sampler does. So every quality figure is reported beside references computed on the same cases:

- **no diversity**: N copies of the readers' majority vote, what a perfect deterministic segmenter
  would score (a sampler must beat it to show that its diversity is worth something);
- **readers**: N masks drawn from the readers themselves, the floor a sampler can reach;
- **consensus**: N copies of the majority of the model's own samples (what its diversity adds).

Cases are chosen spread evenly over a split (`spread_cases`), never its first K, which come from the
same few patients. Means carry a standard error, and a ratio of means a bootstrap interval over cases.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from ssb_fast.metrics import evaluate


def spread_cases(n_total: int, k: int | None) -> list[int]:
    """k case indices spread evenly over [0, n_total) (all of them when k is None or >= n_total)."""
    if k is None or k >= n_total:
        return list(range(n_total))
    if k < 1:
        raise ValueError(f"the number of cases must be >= 1; got {k}")
    return sorted({int(round(x)) for x in np.linspace(0, n_total - 1, k)})


def majority_vote(masks: torch.Tensor, present: torch.Tensor | None = None) -> torch.Tensor:
    """(B, M, H, W) binary masks -> (B, H, W) uint8 majority of the present ones (ties: marked when at
    least half of them mark the pixel, so two readers of four make a pixel)."""
    masks = torch.as_tensor(masks).to(torch.float32)
    if present is None:
        present = torch.ones(masks.shape[:2], dtype=torch.bool)
    weights = torch.as_tensor(present).to(torch.float32).view(*masks.shape[:2], 1, 1)
    votes = (masks * weights).sum(1)
    count = weights.sum(1).clamp_min(1)
    return (2 * votes >= count).to(torch.uint8) * (votes > 0).to(torch.uint8)


def no_diversity(experts: torch.Tensor, present: torch.Tensor, n: int) -> torch.Tensor:
    """(B, n, H, W): n copies of the readers' majority vote per case."""
    vote = majority_vote(experts, present)
    return vote.unsqueeze(1).expand(-1, n, -1, -1).contiguous()


def consensus(samples: torch.Tensor, n: int | None = None) -> torch.Tensor:
    """(B, n, H, W): n copies of the majority of a model's own samples (B, N, H, W)."""
    samples = torch.as_tensor(samples)
    vote = majority_vote(samples)
    return vote.unsqueeze(1).expand(-1, n or samples.shape[1], -1, -1).contiguous()


def reader_draws(experts: torch.Tensor, present: torch.Tensor, n: int, seed: int = 0,
                 case_ids: list[str] | None = None) -> torch.Tensor:
    """(B, n, H, W): n masks drawn uniformly (with replacement) from each case's present readers,
    keyed by (seed, case id) so a case gets the same draws in any subset."""
    experts, present = torch.as_tensor(experts), torch.as_tensor(present).bool()
    out = torch.zeros(experts.shape[0], n, *experts.shape[2:], dtype=torch.uint8)
    for b in range(experts.shape[0]):
        key = f"{seed}\x1e{case_ids[b] if case_ids else b}".encode()
        gen = torch.Generator().manual_seed(int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")
                                            >> 1)
        slots = present[b].nonzero().flatten()
        if slots.numel() == 0:
            continue
        pick = slots[torch.randint(0, slots.numel(), (n,), generator=gen)]
        out[b] = experts[b, pick].to(torch.uint8)
    return out


def mean_se(values) -> tuple[float, float]:
    """Mean and its standard error (sample std / sqrt(n)); se is nan for fewer than two values."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return float("nan"), float("nan")
    se = float(v.std(ddof=1) / np.sqrt(v.size)) if v.size > 1 else float("nan")
    return float(v.mean()), se


def bootstrap_ratio(numerator, denominator, n_boot: int = 2000, seed: int = 0,
                    level: float = 0.95) -> tuple[float, float, float]:
    """Ratio of means sum(a)/sum(b) over paired per-case values, with a percentile bootstrap interval
    from resampling cases: (ratio, low, high)."""
    a, b = np.asarray(numerator, dtype=np.float64), np.asarray(denominator, dtype=np.float64)
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"need paired, non-empty per-case values; got {a.shape} and {b.shape}")
    ratio = float(a.sum() / b.sum()) if b.sum() > 0 else float("nan")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, a.size, size=(n_boot, a.size))
    num, den = a[idx].sum(1), b[idx].sum(1)
    ok = den > 0
    boots = num[ok] / den[ok]
    if boots.size == 0:
        return ratio, float("nan"), float("nan")
    tail = (1 - level) / 2
    return ratio, float(np.quantile(boots, tail)), float(np.quantile(boots, 1 - tail))


def empty_rate(masks: torch.Tensor) -> float:
    """Fraction of masks (.., H, W) with no marked pixel."""
    masks = torch.as_tensor(masks)
    flat = masks.reshape(-1, masks.shape[-2] * masks.shape[-1])
    return float((flat.sum(1) == 0).float().mean()) if flat.shape[0] else float("nan")


def all_empty_cases(masks: torch.Tensor) -> torch.Tensor:
    """(S,) bool: the cases (S, N, H, W) whose every mask is empty."""
    return torch.as_tensor(masks).flatten(1).sum(1) == 0


def reader_empty_rate(experts: torch.Tensor, present: torch.Tensor) -> float:
    """Fraction of the present reader masks that are empty."""
    experts, present = torch.as_tensor(experts), torch.as_tensor(present).bool()
    chosen = experts[present]
    return empty_rate(chosen) if chosen.numel() else float("nan")


def nonempty_ged(samples: torch.Tensor, experts: torch.Tensor, present: torch.Tensor) -> np.ndarray:
    """(S,) float64: the GED of each case's non-empty samples alone against its readers; nan where every
    sample is empty. Beside the GED of all the samples it splits a gap to a reference into what the shapes
    cost and what the empty samples add."""
    samples, experts, present = torch.as_tensor(samples), torch.as_tensor(experts), torch.as_tensor(present)
    marked = samples.flatten(2).sum(-1) > 0
    out = np.full(samples.shape[0], np.nan)
    for case in range(samples.shape[0]):
        if marked[case].any():
            out[case] = float(evaluate(samples[case][marked[case]], experts[case], present=present[case])["ged"])
    return out


def empty_rate_by_label(masks: torch.Tensor, labels: torch.Tensor, n_labels: int) -> list[float | None]:
    """The fraction of empty masks (S, N, H, W) drawn with each expert label 0..n_labels-1 (labels (S, N));
    None for a label no mask was drawn with."""
    empty = torch.as_tensor(masks).flatten(2).sum(-1) == 0
    labels = torch.as_tensor(labels)
    return [float(empty[labels == k].float().mean()) if (labels == k).any() else None for k in range(n_labels)]


def mixed_share_by_label(masks: torch.Tensor, labels: torch.Tensor, n_labels: int) -> list[float | None]:
    """For each expert label, the fraction of cases whose masks drawn with it (two or more) disagree on
    empty vs marked. Near 0 means the sampler draws one outcome per (case, label), its mode: whatever
    diversity of presence it shows comes from the labels alone (see `ssb-fast bench bridge-odds`)."""
    marked = torch.as_tensor(masks).flatten(2).sum(-1) > 0  # (S, N)
    labels = torch.as_tensor(labels)
    shares = []
    for k in range(n_labels):
        sel = labels == k
        count = sel.sum(1)
        n_marked = (marked & sel).sum(1)
        have = count >= 2
        mixed = (n_marked > 0) & (n_marked < count)
        shares.append(float(mixed[have].float().mean()) if have.any() else None)
    return shares


def present_areas(experts: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """(S, M) float64: each reader mask's area in pixels, -1 for an absent reader (so it sorts last)."""
    experts, present = torch.as_tensor(experts), torch.as_tensor(present).bool()
    area = experts.flatten(2).sum(-1).double()
    return torch.where(present, area, torch.full_like(area, -1.0))


def reader_empty_rate_by_rank(experts: torch.Tensor, present: torch.Tensor) -> list[float | None]:
    """For each rank k, the fraction of cases whose k-th widest present reader mask is empty (cases with
    fewer than k + 1 present readers left out): what the expert labels of a model trained with area-rank
    labels should draw."""
    ranked = present_areas(experts, present).sort(1, descending=True).values  # absent readers (-1) last
    rates = []
    for k in range(ranked.shape[1]):
        have = ranked[:, k] >= 0
        rates.append(float((ranked[have, k] == 0).double().mean()) if have.any() else None)
    return rates


def empty_rate_by_marked(masks: torch.Tensor | None, experts: torch.Tensor,
                         present: torch.Tensor) -> dict[int, dict]:
    """Cases grouped by how many readers marked the nodule: {m: {"cases", "samples", "readers"}}, the
    fraction of the samples that are empty beside the fraction of those cases' reader masks that are
    (`masks` None: the readers' alone, without "samples")."""
    experts, present = torch.as_tensor(experts), torch.as_tensor(present).bool()
    marked = ((experts.flatten(2).sum(-1) > 0) & present).sum(1)
    empty = None if masks is None else torch.as_tensor(masks).flatten(2).sum(-1) == 0
    out = {}
    for m in sorted(set(marked.tolist())):
        sel = marked == m
        out[int(m)] = {"cases": int(sel.sum()), "readers": reader_empty_rate(experts[sel], present[sel])}
        if empty is not None:
            out[int(m)]["samples"] = float(empty[sel].float().mean())
    return out


def score_sets(samples, experts, present, keys=("ged", "d_max", "ci", "hm_iou")) -> dict:
    """Per-case metric values {key: (B,) float64 numpy} of a mask set against the readers."""
    scores = evaluate(samples, experts, present=present)
    return {k: torch.as_tensor(scores[k], dtype=torch.float64).numpy() for k in keys}


def summarise(per_case: dict, prefix: str = "") -> dict:
    """{key: mean, key_se: standard error} for every per-case array."""
    out = {}
    for key, values in per_case.items():
        mean, se = mean_se(values)
        out[f"{prefix}{key}"], out[f"{prefix}{key}_se"] = mean, se
    return out
