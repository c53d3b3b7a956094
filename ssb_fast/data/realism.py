"""How CT-like an image set is: intensity histogram, texture (radial power spectrum, parenchyma noise) and
nodule contrast, measured the same way on real crops and on semi-synthetic ones."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ssb_fast.data.filters import dilate, gaussian_blur

GREY = 127.5  # [-1, 1] -> 8-bit grey levels, the units of the real JPEG crops


@dataclass
class RealismStats:
    n_images: int
    histogram: np.ndarray  # density over HIST_EDGES
    spectrum: np.ndarray  # radially averaged power, normalised to sum 1, over spatial frequency bins
    parenchyma_noise: np.ndarray  # per image: std (grey levels) of the fine texture in lung tissue
    nodule_contrast: np.ndarray  # per image: mean inside the readers' union - mean in a ring around it
    nodule_marked: np.ndarray  # per image with a nodule: how many readers marked it (non-empty masks)
    percentiles: np.ndarray  # (5, 25, 50, 75, 95) of all pixels, grey levels

    def summary(self) -> dict:
        return {
            "n_images": self.n_images,
            "grey_percentiles_5_25_50_75_95": [round(float(v), 1) for v in self.percentiles],
            "parenchyma_noise_std": round(float(np.median(self.parenchyma_noise)), 2),
            "nodule_contrast_median": round(float(np.median(self.nodule_contrast)), 1)
            if self.nodule_contrast.size
            else None,
            "nodule_contrast_iqr": [round(float(v), 1) for v in np.percentile(self.nodule_contrast, [25, 75])]
            if self.nodule_contrast.size
            else None,
            # Does the image show how many readers marked the nodule? (Real CT: faint nodules draw fewer.)
            "nodule_contrast_median_by_marked": {
                str(k): {"median": round(float(np.median(self.nodule_contrast[self.nodule_marked == k])), 1),
                         "n": int((self.nodule_marked == k).sum())}
                for k in sorted(set(self.nodule_marked.tolist()))
            },
        }


HIST_EDGES = np.linspace(0.0, 255.0, 52)
SPECTRUM_BINS = 32


def radial_spectrum(image: np.ndarray) -> np.ndarray:
    """Radially averaged power spectrum of one (H, W) image after removing its mean and a Hann window,
    normalised to sum 1, in SPECTRUM_BINS bins from 0 to the Nyquist frequency."""
    h, w = image.shape
    window = np.outer(np.hanning(h), np.hanning(w))
    power = np.abs(np.fft.fftshift(np.fft.fft2((image - image.mean()) * window))) ** 2
    fy = np.fft.fftshift(np.fft.fftfreq(h))[:, None]
    fx = np.fft.fftshift(np.fft.fftfreq(w))[None, :]
    radius = np.sqrt(fx**2 + fy**2) / 0.5
    bins = np.minimum((radius * SPECTRUM_BINS).astype(int), SPECTRUM_BINS)
    total = np.bincount(bins.ravel(), power.ravel(), minlength=SPECTRUM_BINS + 1)[:SPECTRUM_BINS]
    count = np.bincount(bins.ravel(), minlength=SPECTRUM_BINS + 1)[:SPECTRUM_BINS]
    spectrum = total / np.maximum(count, 1)
    return spectrum / max(spectrum.sum(), 1e-12)


def realism_stats(images: np.ndarray, masks: np.ndarray, present: np.ndarray) -> RealismStats:
    """Statistics of single-channel images (N, H, W) or (N, 1, H, W) in [-1, 1] with reader masks
    (N, M, H, W)."""
    images = np.asarray(images, dtype=np.float32)
    if images.ndim == 4:
        images = images[:, 0]
    grey = (images + 1.0) * GREY
    hist, _ = np.histogram(grey, bins=HIST_EDGES, density=True)
    spectrum = np.mean([radial_spectrum(g) for g in grey], axis=0) if len(grey) else np.zeros(SPECTRUM_BINS)
    marked_masks = np.asarray(masks).astype(bool) & np.asarray(present, dtype=bool)[..., None, None]
    union = marked_masks.any(1)
    marked = marked_masks.reshape(*marked_masks.shape[:2], -1).any(-1).sum(1)

    # Lung tissue: dark after smoothing and away from the nodule. Its fine texture is what stays after
    # subtracting a 2-pixel blur.
    smooth = gaussian_blur(grey, 2.0)
    fine = grey - smooth
    lung = (smooth < 40.0) & ~dilate(union, 6)
    noise = np.array([fine[i][lung[i]].std() if lung[i].sum() > 50 else np.nan for i in range(len(grey))])

    ring = dilate(union, 6) & ~dilate(union, 2)
    contrast = np.array(
        [grey[i][union[i]].mean() - grey[i][ring[i]].mean() for i in range(len(grey)) if union[i].any()]
    )
    return RealismStats(
        n_images=len(grey),
        histogram=hist,
        spectrum=spectrum,
        parenchyma_noise=noise[np.isfinite(noise)],
        nodule_contrast=contrast,
        nodule_marked=marked[union.reshape(len(union), -1).any(-1)],
        percentiles=np.percentile(grey, [5, 25, 50, 75, 95]) if len(grey) else np.zeros(5),
    )


def _contrast_density(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    hist, _ = np.histogram(values, bins=edges, density=True)
    return hist


def realism_figure(
    real: tuple[np.ndarray, np.ndarray, np.ndarray],
    synthetic: tuple[np.ndarray, np.ndarray, np.ndarray],
    out_png,
    real_label: str = "real LIDC crops",
    synthetic_label: str = "semi-synthetic",
    n_examples: int = 6,
) -> dict:
    """Write a PNG comparing real and synthetic images: example tiles of each, then the intensity
    histogram, the radial power spectrum and the nodule contrast of both. `real` and `synthetic` are
    (images, masks, present) arrays; returns both sets' summary numbers."""
    from PIL import Image, ImageDraw, ImageFont

    from ssb_fast.data.plotting import Series, line_chart

    stats = {"real": realism_stats(*real), "synthetic": realism_stats(*synthetic)}
    colours = {"real": (30, 90, 200), "synthetic": (220, 80, 40)}
    labels = {
        "real": f"{real_label} (n={stats['real'].n_images})",
        "synthetic": f"{synthetic_label} (n={stats['synthetic'].n_images})",
    }
    tile, gap, chart_h = 128, 4, 230
    width = max(n_examples * (tile + gap) + 150, 3 * 330)
    height = 2 * (tile + gap) + chart_h + 90
    canvas = Image.new("RGB", (width, height), (245, 245, 245))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for row, key in enumerate(("real", "synthetic")):
        images = np.asarray((real, synthetic)[row][0], dtype=np.float32)
        images = images[:, 0] if images.ndim == 4 else images
        y = 6 + row * (tile + gap)
        draw.text((6, y + tile // 2 - 6), labels[key].split(" (")[0], fill=colours[key], font=font)
        picks = np.linspace(0, len(images) - 1, min(n_examples, len(images))).round().astype(int)
        for i, idx in enumerate(picks):
            grey = np.clip((images[idx] + 1.0) * GREY, 0, 255).astype(np.uint8)
            canvas.paste(Image.fromarray(grey).resize((tile, tile)), (150 + i * (tile + gap), y))

    y = 2 * (tile + gap) + 12
    centres = (HIST_EDGES[:-1] + HIST_EDGES[1:]) / 2
    freqs = (np.arange(SPECTRUM_BINS) + 0.5) / SPECTRUM_BINS * 0.5
    contrast_edges = np.linspace(-40, 140, 19)
    contrast_centres = (contrast_edges[:-1] + contrast_edges[1:]) / 2
    panels = [
        (
            "intensity histogram (density, log)",
            "grey level (8-bit)",
            True,
            False,
            lambda s: (centres, s.histogram),
        ),
        (
            "texture: radial power spectrum (log-log)",
            "cycles / pixel",
            True,
            True,
            lambda s: (freqs, s.spectrum),
        ),
        (
            "nodule contrast: inside - ring (density)",
            "grey levels",
            False,
            False,
            lambda s: (contrast_centres, _contrast_density(s.nodule_contrast, contrast_edges)),
        ),
    ]
    panel_w = (width - 4 * gap) // 3
    for p, (title, xlabel, log_y, log_x, get) in enumerate(panels):
        series = [Series(*get(stats[k]), colours[k], labels[k].split(" (")[0][:18]) for k in ("real", "synthetic")]
        box = (gap + p * (panel_w + gap), y, gap + p * (panel_w + gap) + panel_w, y + chart_h)
        line_chart(draw, box, series, title, xlabel, log_y=log_y, log_x=log_x, font=font)
    summary = {k: stats[k].summary() for k in stats}
    text_y = y + chart_h + 8
    for key in ("real", "synthetic"):
        s = summary[key]
        draw.text(
            (8, text_y),
            f"{labels[key]}: grey p5/p25/p50/p75/p95 {s['grey_percentiles_5_25_50_75_95']}, parenchyma "
            "fine-texture "
            f"std {s['parenchyma_noise_std']}, nodule contrast median {s['nodule_contrast_median']} "
            f"IQR {s['nodule_contrast_iqr']}",
            fill=colours[key],
            font=font,
        )
        text_y += 14
    canvas.save(out_png)
    return summary


def images_and_masks(path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images, masks, present) of every split of a project dataset (folder or .npz), or of a raw folder
    that `import-folder` understands (read in memory, nothing written)."""
    import warnings
    from pathlib import Path

    from ssb_fast.data.dataset_format import SPLITS, read_split
    from ssb_fast.data.image_io import DataWarning
    from ssb_fast.data.importers import assemble, read_folder

    path = Path(path)
    if path.suffix == ".npz":
        parts = [read_split(path)]
    elif (path / "meta.json").is_file():
        parts = [read_split(path / f"{s}.npz") for s in SPLITS if (path / f"{s}.npz").is_file()]
    else:
        found, _ = read_folder(path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DataWarning)  # JPEG masks thresholded: expected for real crops
            arrays, _ = assemble([c for group in found.values() for c in group])
        parts = [arrays]
    return tuple(np.concatenate([np.asarray(p[k]) for p in parts]) for k in ("images", "masks", "present"))
