"""The bundled demo: a small trained model and a handful of held-out scans with their readers' masks,
shipped inside the package (`ssb_fast/assets/demo/`), so that `ssb-fast sample` with no arguments shows
the tool at work on any machine, without data or a GPU.

`manifest.json` records where every scan came from (dataset, split, case, licence, credit), how the model
was trained (the command and its data) and what it measured. `train/export_demo.py` writes the folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEMO_DIR = Path(__file__).parent / "assets" / "demo"
MODEL_FILE, SCANS_DIR, MANIFEST_FILE = "model.safetensors", "scans", "manifest.json"
DEMO_SPLIT = "test"
DEFAULT_OUT = "ssb-out"
# Masks per scan: enough for the metrics on a CPU in about a minute; a GPU affords the product's N.
CPU_SAMPLES, CUDA_SAMPLES = 16, 256


class DemoMissingError(FileNotFoundError):
    pass


@dataclass(frozen=True)
class Demo:
    model: Path
    data: Path
    manifest: dict

    @property
    def nfe(self) -> int:
        return int(self.manifest["sampling"]["nfe"])

    def scan_info(self, case_id: str) -> dict:
        return next((s for s in self.manifest["scans"] if s["case_id"] == case_id), {})


def find_demo(folder: Path | None = None) -> Demo:
    """The bundled model and scans (in `folder`, default DEMO_DIR), or DemoMissingError naming what is
    missing (e.g. an install that left out the package data)."""
    folder = DEMO_DIR if folder is None else Path(folder)
    paths = [folder / MODEL_FILE, folder / SCANS_DIR / "meta.json", folder / SCANS_DIR / f"{DEMO_SPLIT}.npz",
             folder / MANIFEST_FILE]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise DemoMissingError(f"the bundled demo is incomplete: missing {', '.join(missing)} (reinstall "
                               f"ssb-fast, or pass --model and --data/--images to sample your own)")
    try:
        manifest = json.loads((folder / MANIFEST_FILE).read_text())
    except json.JSONDecodeError as err:
        raise DemoMissingError(f"{folder / MANIFEST_FILE}: not valid JSON ({err})") from None
    return Demo(folder / MODEL_FILE, folder / SCANS_DIR, manifest)


def demo_samples(device) -> int:
    """Masks per scan on `device` (a torch.device)."""
    return CUDA_SAMPLES if device.type == "cuda" else CPU_SAMPLES


@dataclass
class ScanReport:
    case_id: str
    source: str
    readers_marked: int
    readers: int
    ged: float
    ged_no_diversity: float
    d_max: float
    empty: int
    n_samples: int


def scan_reports(summary: dict, demo: Demo) -> list[ScanReport]:
    """Each sampled scan's GED and D_max against its readers, beside the no-diversity reference (N copies
    of the readers' majority) on the same scan."""
    from ssb_fast.data import load
    from ssb_fast.metrics import evaluate
    from ssb_fast.references import no_diversity

    scans = load(demo.data, DEMO_SPLIT)
    index = {cid: i for i, cid in enumerate(scans.case_ids)}
    reports = []
    for case in summary["cases"]:
        i = index[case["case_id"]]
        experts, present = scans.masks[i : i + 1], scans.present[i : i + 1]
        n = summary["n_samples"]
        copies = no_diversity(experts, present, n)[0]
        reference = evaluate(copies, experts[0], present[0], device="cpu")
        marked = int((experts[0].reshape(experts.shape[1], -1).amax(1) > 0)[present[0]].sum())
        info = demo.scan_info(case["case_id"])
        with np.load(Path(summary["out"]) / case["file"]) as f:
            masks = f["samples"]
        reports.append(ScanReport(
            case["case_id"], info.get("source", "?"), marked, int(present[0].sum()), case["metrics"]["ged"],
            reference["ged"], case["metrics"]["d_max"],
            int((masks.reshape(masks.shape[0], -1).max(1) == 0).sum()), n))
    return reports


def format_reports(reports: list[ScanReport]) -> str:
    n = reports[0].n_samples if reports else 0
    lines = [f"{'scan':<28} {'source':<14} {'marked':>7} {f'GED_{n}':>8} {'no-div':>7} {'D_max':>6} {'empty':>6}"]
    for r in reports:
        lines.append(f"{r.case_id:<28} {r.source:<14} {f'{r.readers_marked}/{r.readers}':>7} {r.ged:>8.3f} "
                     f"{r.ged_no_diversity:>7.3f} {r.d_max:>6.3f} {f'{r.empty}/{r.n_samples}':>6}")
    for source in sorted({r.source for r in reports}):
        group = [r for r in reports if r.source == source]
        ged = float(np.mean([r.ged for r in group]))
        ref = float(np.mean([r.ged_no_diversity for r in group]))
        lines.append(f"mean over the {len(group)} {source} scan(s): GED_{n} {ged:.3f} against {ref:.3f} for no "
                     f"diversity ({n} copies of the readers' majority); lower is better")
    lines.append("marked: readers who drew the nodule, of those who read the scan; empty: samples with no "
                 "nodule")
    return "\n".join(lines)
