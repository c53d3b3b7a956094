"""NFE against quality: how right and how diverse the masks are at each number of steps, and how fast.

For each NFE the same cases are sampled with the same keyed noise and scored against their readers
with every metric (mean ± standard error over cases), beside three references on the same cases: no
diversity (N copies of the readers' majority), the model's own consensus (N copies of the majority of
its samples at the largest NFE) and the readers (N masks drawn from them, the floor). The model's GED
is also given as a ratio to the no-diversity reference, with a bootstrap interval over cases. Cases
are spread evenly over the split, never its first K.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Callable

import numpy as np
import torch
from ssb_fast.bench.environment import device_name, load_average, versions

from ssb_fast.atomic import write_atomic
from ssb_fast.bridge import Bridge
from ssb_fast.devices import describe_device
from ssb_fast.metrics import CONVENTIONS, METRIC_NAMES, evaluate
from ssb_fast.references import (
    all_empty_cases,
    bootstrap_ratio,
    consensus,
    empty_rate,
    empty_rate_by_label,
    empty_rate_by_marked,
    mean_se,
    mixed_share_by_label,
    no_diversity,
    nonempty_ged,
    reader_draws,
    reader_empty_rate,
    reader_empty_rate_by_rank,
    spread_cases,
)
from ssb_fast.sampler import Sampler

EVAL_BATCH = 32  # scans per metrics call
REFERENCES = ("no_diversity", "consensus", "readers")


def case_scores(samples: torch.Tensor, experts: torch.Tensor, present: torch.Tensor) -> dict[str, np.ndarray]:
    """Per-case values of every metric, evaluated in batches of scans."""
    parts: dict[str, list] = {k: [] for k in METRIC_NAMES}
    for lo in range(0, samples.shape[0], EVAL_BATCH):
        hi = lo + EVAL_BATCH
        out = evaluate(samples[lo:hi], experts[lo:hi], present=present[lo:hi])
        for k in METRIC_NAMES:
            parts[k].append(torch.as_tensor(out[k], dtype=torch.float64).numpy())
    return {k: np.concatenate(v) for k, v in parts.items()}


def summarise_scores(per_case: dict[str, np.ndarray], subsets: dict[str, np.ndarray]) -> dict:
    out = {}
    for key, values in per_case.items():
        mean, se = mean_se(values)
        out[key] = {"mean": mean, "se": se}
    out["subsets"] = ged_by_subset(per_case["ged"], subsets)
    return out


def ged_by_subset(ged: np.ndarray, subsets: dict[str, np.ndarray]) -> dict:
    """Per subset, the mean ± s.e. of per-case GED values over its cases with a finite value (n of them; a
    case has none in `nonempty_ged` when every sample is empty)."""
    out = {}
    for name, sel in subsets.items():
        values = ged[sel & np.isfinite(ged)]
        mean, se = mean_se(values)
        out[name] = {"n": int(values.size), "ged": mean, "ged_se": se}
    return out


def reader_subsets(experts: torch.Tensor, present: torch.Tensor) -> tuple[torch.Tensor, dict[str, np.ndarray]]:
    """(readers who marked each case, the named case subsets): every present reader marked the nodule, some
    did and some did not, two or more did."""
    marked = (experts.flatten(2).sum(-1) > 0) & present
    n_marked, n_present = marked.sum(1), present.sum(1)
    return n_marked, {"all_readers_marked": ((n_marked == n_present) & (n_marked > 0)).numpy(),
                      "some_readers_marked": ((n_marked < n_present) & (n_marked > 0)).numpy(),
                      "two_or_more_marked": (n_marked >= 2).numpy()}


def empty_breakdown(masks: torch.Tensor, labels: torch.Tensor, n_labels: int, experts: torch.Tensor,
                    present: torch.Tensor) -> dict:
    """Where the empty samples are: by the expert label they were drawn with, and by how many readers marked
    the case (beside the readers' own rates, in the report's `readers_empty`); and per label, how often the
    masks of one case disagree on empty vs marked (0: the sampler draws one outcome per case and label)."""
    return {"empty_rate_by_label": empty_rate_by_label(masks, labels, n_labels),
            "mixed_share_by_label": mixed_share_by_label(masks, labels, n_labels),
            "empty_rate_by_marked": {str(m): v for m, v in empty_rate_by_marked(masks, experts, present).items()}}


def readers_empty(experts: torch.Tensor, present: torch.Tensor) -> dict:
    """The readers' empty masks: in all, by rank of area (what area-rank label k should draw) and by how many
    readers marked the case."""
    return {"all": reader_empty_rate(experts, present), "by_rank": reader_empty_rate_by_rank(experts, present),
            "by_marked": {str(m): v["readers"] for m, v in empty_rate_by_marked(None, experts, present).items()}}


def render_empty_breakdown(rows: list[dict], keys: dict[str, str], readers: dict) -> list[str]:
    """Markdown lines: empty samples by expert label and by readers who marked, one line per row, the readers'
    own rates last (label k beside the k-th widest reader mask). `keys`: the row fields that name a row, and
    their column titles."""
    marked = list(readers["by_marked"])
    fmt = lambda v: "—" if v is None else f"{v:.0%}"
    name = lambda r: " | ".join(f"{r[k]:g}" if isinstance(r[k], float) else str(r[k]) for k in keys)
    label_titles = " | ".join(f"label {k}" for k in range(len(readers["by_rank"])))
    lines = ["", "Empty samples by expert label (the readers: by rank of area) and by how many readers marked "
             "the case (cases in brackets):", "",
             "| " + " | ".join(keys.values()) + " | " + label_titles
             + " | " + " | ".join(f"{m} marked ({rows[0]['empty_rate_by_marked'][m]['cases']})" for m in marked)
             + " |",
             "|" + " ---: |" * (len(keys) + len(readers["by_rank"]) + len(marked))]
    for r in rows:
        lines.append("| " + name(r) + " | "
                     + " | ".join(fmt(v) for v in r["empty_rate_by_label"]) + " | "
                     + " | ".join(fmt(r["empty_rate_by_marked"][m]["samples"]) for m in marked) + " |")
    lines.append("| readers" + " |" * len(keys) + " " + " | ".join(fmt(v) for v in readers["by_rank"]) + " | "
                 + " | ".join(fmt(readers["by_marked"][m]) for m in marked) + " |")
    if all("mixed_share_by_label" in r for r in rows):
        lines += ["", "Cases whose masks of one expert label disagree on empty vs marked (0%: each label draws one "
                  "outcome per case, its mode; `ssb-fast bench bridge-odds` shows why):", "",
                  "| " + " | ".join(keys.values()) + " | " + label_titles + " |",
                  "|" + " ---: |" * (len(keys) + len(readers["by_rank"]))]
        lines += ["| " + name(r) + " | " + " | ".join(fmt(v) for v in r["mixed_share_by_label"]) + " |" for r in rows]
    return lines


def report_header(kind: str, net, dataset, picks: list[int], cases: int | None, subsets: dict[str, np.ndarray],
                  device: torch.device) -> dict:
    """What every quality report starts with: kind, date, device and versions, the model, and which cases."""
    return {
        "kind": kind, "date": _dt.date.today().isoformat(), "device": describe_device(device),
        "device_name": device_name(device), "versions": versions(device), "load_average": load_average(),
        "model": {"preset": net.config.preset, "image_size": net.config.image_size},
        "data": {"source": str(dataset.source), "split_cases": len(dataset), "cases": len(picks),
                 "case_indices": picks, "spread": "evenly over the split" if cases else "the whole split",
                 "subset_sizes": {k: int(v.sum()) for k, v in subsets.items()},
                 "appearance": dataset.meta.get("build", {}).get("appearance")},
    }


def sample_sweep(net, bridge: Bridge, dataset, picks: list[int], nfes: list[int], n_samples: int = 16,
                 guidance: float = 1.0, seed: int = 0, device: torch.device | str = "cpu",
                 max_batch: int | None = None, log: Callable[[str], None] | None = None,
                 first_step_noise: float = 1.0) -> dict[int, dict]:
    """Sample the cases `picks` (split indices) at every NFE: per NFE the masks (S, N, H, W), their expert
    labels (S, N), the steady masks/s and the warm-up seconds. The noise is keyed by case id and mask index,
    so a case's masks are the same whichever cases are sampled beside it."""
    device = torch.device(device)
    idx = torch.tensor(picks, dtype=torch.int64)
    scans = dataset.images[idx].float()
    case_ids = [dataset.case_ids[i] for i in picks]
    sampled = {}
    for nfe in sorted(nfes):
        if log:
            log(f"NFE {nfe}: {len(picks)} cases x {n_samples} masks")
        sampler = Sampler(net, bridge, nfe=nfe, guidance=guidance, seed=seed, device=device, max_batch=max_batch,
                          first_step_noise=first_step_noise)
        result = sampler.sample(scans, n_samples, case_ids=case_ids)
        sampled[nfe] = {"masks": result.masks.bool(), "labels": result.labels,
                        "masks_per_s": result.stats["masks_per_s"], "warmup_s": result.stats["warmup_seconds"]}
    return sampled


def score_sweep(net, dataset, picks: list[int], cases: int | None, sampled: dict[int, dict], n_samples: int,
                guidance: float, seed: int, device: torch.device | str = "cpu", first_step_noise: float = 1.0) -> dict:
    """The report of `sample_sweep`'s masks (every case of `picks`, in that order): every metric per NFE,
    the references on the same cases, the ratio to no diversity with its bootstrap interval."""
    device = torch.device(device)
    nfes = sorted(sampled)
    idx = torch.tensor(picks, dtype=torch.int64)
    experts, present = dataset.masks[idx], dataset.present[idx]
    case_ids = [dataset.case_ids[i] for i in picks]
    n_marked, subsets = reader_subsets(experts, present)

    rows, per_case_by_nfe, empty_of = [], {}, {}
    for nfe in nfes:
        masks, labels, mps = sampled[nfe]["masks"], sampled[nfe]["labels"], sampled[nfe]["masks_per_s"]
        per_case = case_scores(masks, experts, present)
        per_case_by_nfe[nfe] = per_case
        empty_of[nfe] = (masks.flatten(2).sum(-1) == 0).double().mean(1).numpy()
        shapes = nonempty_ged(masks, experts, present)
        all_empty = all_empty_cases(masks)
        rows.append({"nfe": nfe, **summarise_scores(per_case, subsets), "empty_rate": empty_rate(masks),
                     **empty_breakdown(masks, labels, net.config.n_labels, experts, present),
                     "subsets_nonempty": ged_by_subset(shapes, subsets),
                     "all_empty_cases_2plus_marked": int((all_empty & (n_marked >= 2)).sum()),
                     "all_empty_case_ids_2plus_marked": [case_ids[i] for i in
                                                         (all_empty & (n_marked >= 2)).nonzero().flatten().tolist()],
                     "masks_per_s": mps, "ms_per_nfe_per_mask": 1000.0 / (mps * nfe) if mps and mps > 0 else None,
                     "warmup_s": sampled[nfe]["warmup_s"]})

    references = {}
    ref_sets = {"no_diversity": no_diversity(experts, present, n_samples),
                "consensus": consensus(sampled[max(nfes)]["masks"], n_samples),
                "readers": reader_draws(experts, present, n_samples, seed, case_ids)}
    ref_scores = {}
    for name, masks in ref_sets.items():
        ref_scores[name] = case_scores(masks, experts, present)
        references[name] = {**summarise_scores(ref_scores[name], subsets), "empty_rate": empty_rate(masks)}
    references["readers"]["empty_rate"] = reader_empty_rate(experts, present)
    reader_area = (experts.flatten(2).sum(-1).double() * present).sum(1) / present.sum(1).clamp(min=1)
    per_case_rows = [{"case_id": case_ids[j], "readers_marked": int(n_marked[j]), "readers": int(present[j].sum()),
                      "reader_area_px": round(float(reader_area[j]), 1),
                      "no_diversity_ged": float(ref_scores["no_diversity"]["ged"][j]),
                      "ged": {str(nfe): float(per_case_by_nfe[nfe]["ged"][j]) for nfe in nfes},
                      "empty": {str(nfe): float(empty_of[nfe][j]) for nfe in nfes}}
                     for j in range(len(picks))]
    for row in rows:
        ged = per_case_by_nfe[row["nfe"]]["ged"]
        ratio, low, high = bootstrap_ratio(ged, ref_scores["no_diversity"]["ged"], seed=seed)
        row["ged_ratio_to_no_diversity"] = {"ratio": ratio, "low": low, "high": high}
        sel = subsets["all_readers_marked"]
        if sel.any():
            r, lo, hi = bootstrap_ratio(ged[sel], ref_scores["no_diversity"]["ged"][sel], seed=seed)
            row["ged_ratio_all_readers_marked"] = {"ratio": r, "low": lo, "high": hi}
    return {
        **report_header("nfe", net, dataset, picks, cases, subsets, device),
        "n_samples": n_samples, "guidance": guidance, "first_step_noise": first_step_noise, "seed": seed,
        "nfes": nfes, "conventions": CONVENTIONS, "rows": rows, "references": references,
        "readers_empty": readers_empty(experts, present), "cases": per_case_rows,
    }


def run_nfe_sweep(net, bridge: Bridge, dataset, nfes: list[int], n_samples: int = 16, cases: int | None = None,
                  guidance: float = 1.0, seed: int = 0, device: torch.device | str = "cpu",
                  max_batch: int | None = None, log: Callable[[str], None] | None = None,
                  first_step_noise: float = 1.0) -> dict:
    """Sample the chosen cases at every NFE and score them with the references; returns the report."""
    picks = spread_cases(len(dataset), cases)
    sampled = sample_sweep(net, bridge, dataset, picks, nfes, n_samples, guidance, seed, device, max_batch, log,
                           first_step_noise)
    return score_sweep(net, dataset, picks, cases, sampled, n_samples, guidance, seed, device, first_step_noise)


def plus_minus(entry: dict, spec: str = ".3f") -> str:
    return f"{entry['mean']:{spec}} ± {entry['se']:{spec}}"


def render_costliest_cases(cases: list[dict], nfe: str, k: int = 10) -> list[str]:
    """Markdown lines: the `k` cases whose GED at `nfe` is furthest above no diversity's, with how many readers
    marked them, the readers' mean mask area and the model's empty samples (every case: `cases` in nfe.json)."""
    worst = sorted(cases, key=lambda c: c["ged"][nfe] - c["no_diversity_ged"], reverse=True)[:k]
    lines = ["", f"The {len(worst)} cases furthest above no diversity at NFE {nfe} (every case: `cases` in nfe.json):",
             "", "| case | marked | readers' mean area (px) | GED | no diversity | empty samples |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {c['case_id']} | {c['readers_marked']}/{c['readers']} | {c['reader_area_px']:g} | "
              f"{c['ged'][nfe]:.3f} | {c['no_diversity_ged']:.3f} | {c['empty'][nfe]:.0%} |" for c in worst]
    return lines


def render_markdown(report: dict) -> str:
    """Quality against NFE as a markdown table, references below, with N, the cases and the seed."""
    d = report["data"]
    lines = [f"# NFE against quality, {report['date']}, {report['device']}", "",
             f"`{report['model']['preset']}` at {report['model']['image_size']}², N = {report['n_samples']} masks per "
             f"case, guidance {report['guidance']:g}"
             + (f", first-step noise {report['first_step_noise']:g}" if report.get("first_step_noise", 1) != 1 else "")
             + f", seed {report['seed']}; {d['cases']} cases of {d['split_cases']} "
             f"({d['spread']}) from {d['source']}"
             + (f" (images: {d['appearance']})" if d.get("appearance") else "")
             + (f"; sampled in {d['parts']} parts, masks/s is one process's rate" if d.get("parts") else "")
             + "; mean ± standard error over cases.", "",
             "| NFE | GED | GED / no diversity (95% CI) | D_max | D_a | S_c | CI | HM-IoU | DDI_e | DDI_g | empty | "
             "all empty, ≥ 2 marked | masks/s | ms/NFE/mask |",
             "| ---: | --- | --- | --- | --- | --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: |"]
    for r in report["rows"]:
        ratio = r["ged_ratio_to_no_diversity"]
        lines.append(
            f"| {r['nfe']} | {plus_minus(r['ged'])} | {ratio['ratio']:.2f} ({ratio['low']:.2f}–{ratio['high']:.2f}) | "
            + " | ".join(plus_minus(r[k]) for k in ("d_max", "d_a", "s_c", "ci", "hm_iou", "ddi_e", "ddi_g"))
            + f" | {r['empty_rate']:.1%} | {r['all_empty_cases_2plus_marked']} | {r['masks_per_s']:.2f} | "
              f"{r['ms_per_nfe_per_mask']:.2f} |")
    lines += ["", "| reference | GED | D_max | CI | HM-IoU | empty |", "| --- | --- | --- | --- | --- | ---: |"]
    names = {"no_diversity": "no diversity (N × readers' majority)",
             "consensus": f"consensus (N × majority of the samples at NFE {max(report['nfes'])})",
             "readers": "readers (N draws from the readers)"}
    for key, ref in report["references"].items():
        lines.append(f"| {names[key]} | {plus_minus(ref['ged'])} | {plus_minus(ref['d_max'])} | "
                     f"{plus_minus(ref['ci'])} | "
                     f"{plus_minus(ref['hm_iou'])} | {ref['empty_rate']:.1%} |")
    lines += ["", "GED by subset (cases): " + "; ".join(
        f"{name} ({size})" for name, size in d["subset_sizes"].items())]
    lines += ["", "| NFE | " + " | ".join(d["subset_sizes"]) + " |", "| ---: |" + " --- |" * len(d["subset_sizes"])]
    for r in report["rows"]:
        lines.append(f"| {r['nfe']} | " + " | ".join(
            f"{s['ged']:.3f} ± {s['ged_se']:.3f}" for s in r["subsets"].values()) + " |")
    for r in report["rows"]:
        if "subsets_nonempty" in r:
            lines.append(f"| {r['nfe']}, non-empty samples only | " + " | ".join(
                f"{s['ged']:.3f} ± {s['ged_se']:.3f} ({s['n']})" for s in r["subsets_nonempty"].values()) + " |")
    for key, ref in report["references"].items():
        lines.append(f"| {key} | " + " | ".join(
            f"{s['ged']:.3f} ± {s['ged_se']:.3f}" for s in ref["subsets"].values()) + " |")
    marked_ratios = [(r["nfe"], r["ged_ratio_all_readers_marked"]) for r in report["rows"]
                     if "ged_ratio_all_readers_marked" in r]
    if marked_ratios:
        lines += ["", "GED / no diversity on the nodules every present reader marked (95% bootstrap interval): "
                  + "; ".join(f"NFE {nfe} {x['ratio']:.2f} ({x['low']:.2f}–{x['high']:.2f})"
                              for nfe, x in marked_ratios) + "."]
    if "readers_empty" in report:
        lines += render_empty_breakdown(report["rows"], {"nfe": "NFE"}, report["readers_empty"])
    if report.get("cases"):
        lines += render_costliest_cases(report["cases"], str(max(report["nfes"])))
    lines += ["", "empty: the fraction of empty masks; all empty, ≥ 2 marked: cases whose every sample is empty "
              "although two or more readers marked the nodule. Non-empty samples only: the GED of each case's "
              "non-empty samples alone (cases with one or more, in brackets); what a row loses beside it is what "
              "its empty samples cost, the rest is the shapes'.",
              "", "Empty masks: IoU(∅,∅) = Dice(∅,∅) = 1; GED squared over all ordered pairs including i = j; "
              "missing readers left out.", f"Versions: {', '.join(f'{k} {v}' for k, v in report['versions'].items())}."]
    return "\n".join(lines) + "\n"


def plot(report: dict, path) -> bool:
    """nfe.png: GED and D_max against NFE (log axis) with the references as lines, masks/s on a second
    axis. Returns False when matplotlib is not installed (the `plot` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = report["rows"]
    nfes = [r["nfe"] for r in rows]
    fig, (ax_ged, ax_dmax) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    styles = {"no_diversity": ("tab:red", "--"), "consensus": ("tab:purple", ":"), "readers": ("tab:green", "-.")}
    for ax, key, label in ((ax_ged, "ged", "GED (lower is better)"), (ax_dmax, "d_max", "D_max (higher is better)")):
        mean = np.array([r[key]["mean"] for r in rows])
        se = np.array([r[key]["se"] for r in rows])
        ax.errorbar(nfes, mean, yerr=se, marker="o", color="tab:blue", capsize=3, label="model (± s.e.)")
        for ref, (colour, style) in styles.items():
            ax.axhline(report["references"][ref][key]["mean"], color=colour, linestyle=style,
                       label=ref.replace("_", " "))
        ax.set_xscale("log")
        ax.set_xticks(nfes)
        ax.set_xticklabels([str(n) for n in nfes])
        ax.set_xlabel("NFE (network evaluations per mask)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    speed = ax_ged.twinx()
    speed.plot(nfes, [r["masks_per_s"] for r in rows], color="tab:gray", marker="s", alpha=0.6, label="masks/s")
    speed.set_ylabel("masks/s (steady)", color="tab:gray")
    speed.set_yscale("log")
    handles, labels = ax_ged.get_legend_handles_labels()
    h2, l2 = speed.get_legend_handles_labels()
    ax_ged.legend(handles + h2, labels + l2, fontsize=8, loc="best", framealpha=0.8)
    d = report["data"]
    fig.suptitle(f"{report['model']['preset']}, N = {report['n_samples']}, {d['cases']} cases ({d['spread']}), "
                 f"guidance {report['guidance']:g}, {report['device']}", fontsize=10)
    fig.tight_layout()
    write_atomic(path, lambda fh: fig.savefig(fh, format="png"))
    plt.close(fig)
    return True
