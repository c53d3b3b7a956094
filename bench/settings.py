"""Sampling settings against quality: guidance w, how expert labels are given to the masks, the first
step's noise scale and the threshold on x0̂, at one NFE, on the same cases with the same keyed noise.

Each setting is scored like `bench nfe` scores an NFE (every metric, mean ± standard error over cases
spread evenly over the split, GED as a ratio to no diversity with a bootstrap interval, the empty-sample
rate and the GED on the reader subsets). The thresholds reuse one sampling run per (labels, w, first-step
noise): the masks are x0̂ > threshold of the same soft x0̂.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from ssb_fast.bench.nfe import (
    case_scores,
    empty_breakdown,
    plus_minus,
    reader_subsets,
    readers_empty,
    render_empty_breakdown,
    report_header,
    summarise_scores,
)

from ssb_fast.bridge import Bridge
from ssb_fast.references import (
    all_empty_cases,
    bootstrap_ratio,
    empty_rate,
    no_diversity,
    reader_empty_rate,
    spread_cases,
)
from ssb_fast.sampler import Sampler


def run_settings_sweep(net, bridge: Bridge, dataset, nfe: int = 10, n_samples: int = 16, cases: int | None = None,
                       guidances=(1.0,), label_modes=("cycle",), thresholds=(0.0,), seed: int = 0,
                       device: torch.device | str = "cpu", max_batch: int | None = None,
                       log: Callable[[str], None] | None = None, first_step_noises=(1.0,)) -> dict:
    """Sample the chosen cases once per (label mode, w, first-step noise) and score every threshold; returns
    the report."""
    device = torch.device(device)
    if any(not -1.0 < t < 1.0 for t in thresholds):
        raise ValueError(f"thresholds lie in (-1, 1), where x0̂ lives; got {list(thresholds)}")
    picks = spread_cases(len(dataset), cases)
    idx = torch.tensor(picks, dtype=torch.int64)
    scans = dataset.images[idx].float()
    experts, present = dataset.masks[idx], dataset.present[idx]
    case_ids = [dataset.case_ids[i] for i in picks]
    n_marked, subsets = reader_subsets(experts, present)
    reference = case_scores(no_diversity(experts, present, n_samples), experts, present)

    rows = []
    for mode, w, noise in ((m, w, s) for m in label_modes for w in guidances for s in first_step_noises):
        if log:
            log(f"labels {mode}, w {w:g}, first-step noise {noise:g}: {len(picks)} cases x {n_samples} masks, "
                f"NFE {nfe}")
        sampler = Sampler(net, bridge, nfe=nfe, guidance=w, labels=mode, seed=seed, device=device,
                          max_batch=max_batch, first_step_noise=noise)
        result = sampler.sample(scans, n_samples, case_ids=case_ids, return_soft=True)
        for threshold in thresholds:
            masks = (result.soft > threshold).to(torch.uint8)
            per_case = case_scores(masks, experts, present)
            ratio, low, high = bootstrap_ratio(per_case["ged"], reference["ged"], seed=seed)
            all_empty = all_empty_cases(masks)
            rows.append({"labels": mode, "guidance": w, "first_step_noise": noise, "threshold": threshold,
                         **summarise_scores(per_case, subsets),
                         "empty_rate": empty_rate(masks),
                         **empty_breakdown(masks, result.labels, net.config.n_labels, experts, present),
                         "all_empty_cases_2plus_marked": int((all_empty & (n_marked >= 2)).sum()),
                         "ged_ratio_to_no_diversity": {"ratio": ratio, "low": low, "high": high},
                         "masks_per_s": result.stats["masks_per_s"]})
    return {
        **report_header("settings", net, dataset, picks, cases, subsets, device),
        "n_samples": n_samples, "nfe": nfe, "seed": seed, "rows": rows,
        "no_diversity": {**summarise_scores(reference, subsets),
                         "empty_rate": empty_rate(no_diversity(experts, present, n_samples))},
        "readers_empty_rate": reader_empty_rate(experts, present),
        "readers_empty": readers_empty(experts, present),
    }


def render_markdown(report: dict) -> str:
    # Reports written before the first-step noise was a setting sampled with I2SB's posterior noise (1).
    report = {**report, "rows": [{"first_step_noise": 1.0, **r} for r in report["rows"]]}
    d = report["data"]
    subsets = list(d["subset_sizes"])
    lines = [f"# Sampling settings against quality, {report['date']}, {report['device']}", "",
             f"`{report['model']['preset']}` at {report['model']['image_size']}², NFE {report['nfe']}, "
             f"N = {report['n_samples']} masks per case, seed {report['seed']}; {d['cases']} cases of "
             f"{d['split_cases']} ({d['spread']}) from {d['source']}; mean ± standard error over cases.", "",
             "| labels | w | first-step noise | threshold | GED | GED / no diversity (95% CI) | D_max | empty | "
             "all empty, ≥ 2 marked | " + " | ".join(f"GED {s} ({d['subset_sizes'][s]})" for s in subsets) + " |",
             "| --- | ---: | ---: | ---: | --- | --- | --- | ---: | ---: |" + " --- |" * len(subsets)]
    for r in report["rows"]:
        ratio = r["ged_ratio_to_no_diversity"]
        lines.append(f"| {r['labels']} | {r['guidance']:g} | {r['first_step_noise']:g} | {r['threshold']:g} | "
                     f"{plus_minus(r['ged'])} | "
                     f"{ratio['ratio']:.2f} ({ratio['low']:.2f}–{ratio['high']:.2f}) | {plus_minus(r['d_max'])} | "
                     f"{r['empty_rate']:.1%} | {r['all_empty_cases_2plus_marked']} | "
                     + " | ".join(f"{r['subsets'][s]['ged']:.3f} ± {r['subsets'][s]['ged_se']:.3f}" for s in subsets)
                     + " |")
    if "readers_empty" in report:
        lines += render_empty_breakdown(report["rows"], {"labels": "labels", "guidance": "w",
                                                         "first_step_noise": "first-step noise",
                                                         "threshold": "threshold"}, report["readers_empty"])
    ref = report["no_diversity"]
    lines += ["", f"No diversity (N × the readers' majority): GED {plus_minus(ref['ged'])}, "
              f"D_max {plus_minus(ref['d_max'])}, "
              + ", ".join(f"GED {s} {ref['subsets'][s]['ged']:.3f} ± {ref['subsets'][s]['ged_se']:.3f}"
                          for s in subsets)
              + f"; the readers' masks are {report['readers_empty_rate']:.1%} empty.",
              "", "labels: cycle = mask i gets expert i mod M; random = drawn per mask. threshold: mask = x0̂ > "
              "threshold (x0̂ in [-1, 1]; 0 is the sampler's own rule). first-step noise: the factor on the "
              "standard deviation of the first step's noise (1 = I2SB's posterior).",
              f"Versions: {', '.join(f'{k} {v}' for k, v in report['versions'].items())}."]
    return "\n".join(lines) + "\n"
