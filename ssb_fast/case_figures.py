"""Pictures of one sampled case for people: the one-row preview strip and the grid.

The grid reads top to bottom: the scan and each reader's mask over it; a dozen samples over the scan,
each titled with the expert label it was drawn with; then the mean (pixel frequency), the entropy of
the mean in bits (each with a colour bar) and the majority mask; a caption with the settings, the
uncertainty and, with readers, the case's metrics.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ssb_fast.atomic import write_atomic
from ssb_fast.render import (
    CAPTION,
    READER_COLOURS,
    SAMPLE_COLOUR,
    TEXT,
    draw_colour_bar,
    grey_rgb,
    heat,
    new_canvas,
    overlay,
    paste_tiles,
)

PREVIEW_SAMPLES = 6
PREVIEW_TILE = 128
GRID_SAMPLES = 12
GRID_COLUMNS = 6
GRID_MAX_TILE = 256
MAJORITY_COLOUR = (255, 255, 255)


def _save_png(path: str | os.PathLike, canvas) -> Path:
    def save(fh):
        canvas.save(fh, format="PNG")

    return write_atomic(path, save)


def write_case_preview(path: str | os.PathLike, scan: np.ndarray, samples: np.ndarray, labels: np.ndarray,
                       experts: np.ndarray, present: np.ndarray, caption: str) -> Path:
    """One row of tiles: the scan, each expert's mask over it, the first samples over it (titled with the
    expert label each was drawn with), the mean mask (pixelwise probability) and the per-pixel std
    (uncertainty, 0 to 0.5), with a caption below."""
    height, width = samples.shape[-2:]
    scale = max(1, PREVIEW_TILE // max(height, width))
    th, tw, gap, header, footer = height * scale, width * scale, 2, 16, 16
    grey = grey_rgb(np.asarray(scan, dtype=np.float32))
    tiles: list[tuple[str, np.ndarray | None]] = [("scan", grey)]
    for k in range(experts.shape[0]):
        colour = READER_COLOURS[k % len(READER_COLOURS)]
        tiles.append((f"expert {k + 1}", overlay(grey, experts[k], colour) if present[k] else None))
    for i in range(min(PREVIEW_SAMPLES, samples.shape[0])):
        tiles.append((f"sample {i + 1} / expert {int(labels[i]) + 1}", overlay(grey, samples[i], SAMPLE_COLOUR)))
    prob = samples.astype(np.float64).mean(axis=0)
    tiles.append(("mean", heat(prob)))
    tiles.append(("std (max 0.5)", heat(np.sqrt(prob * (1.0 - prob)) / 0.5)))  # std of 0/1 values
    canvas, draw, font = new_canvas(len(tiles) * (tw + gap), header + th + footer)
    for c, (title, _) in enumerate(tiles):
        draw.text((c * (tw + gap) + 3, 2), title, fill=TEXT, font=font)
    paste_tiles(canvas, draw, font, [tile for _, tile in tiles], header, tw, th, gap)
    draw.text((3, header + th + 2), caption, fill=CAPTION, font=font)
    return _save_png(path, canvas)


def grid_tile_size(height: int, width: int) -> tuple[int, int]:
    """(tile height, tile width): small scans scaled up by a whole factor to about PREVIEW_TILE pixels,
    large ones scaled down to at most GRID_MAX_TILE."""
    scale = max(1, PREVIEW_TILE // max(height, width))
    th, tw = height * scale, width * scale
    if max(th, tw) > GRID_MAX_TILE:
        shrink = GRID_MAX_TILE / max(th, tw)
        th, tw = max(1, round(th * shrink)), max(1, round(tw * shrink))
    return th, tw


GRID_GAP, GRID_TITLE, GRID_ROW_TITLE, GRID_BAR = 4, 22, 14, 46


def grid_size(height: int, width: int, n_samples: int, n_experts: int, n_caption_lines: int) -> tuple[int, int]:
    """(width, height) in pixels of the grid of an H x W case with N samples and `n_experts` reader slots."""
    th, tw = grid_tile_size(height, width)
    columns = max(GRID_COLUMNS, 1 + n_experts)
    sample_rows = -(-min(GRID_SAMPLES, n_samples) // GRID_COLUMNS)
    rows = 1 + sample_rows + 1  # scan + readers, the samples, the maps
    map_row = 3 * tw + 2 * GRID_BAR + 4 * GRID_GAP
    canvas_w = max(columns * (tw + GRID_GAP) - GRID_GAP, map_row)
    canvas_h = GRID_TITLE + rows * (GRID_ROW_TITLE + th + GRID_GAP) + 14 * n_caption_lines + 4
    return canvas_w, canvas_h


def write_case_grid(path: str | os.PathLike, scan: np.ndarray, samples: np.ndarray, labels: np.ndarray,
                    experts: np.ndarray, present: np.ndarray, mean: np.ndarray, entropy: np.ndarray,
                    majority: np.ndarray, title: str, caption: list[str]) -> Path:
    """The grid.png of a case (see the module docstring); `caption` lines go below the maps."""
    height, width = samples.shape[-2:]
    th, tw = grid_tile_size(height, width)
    canvas_w, canvas_h = grid_size(height, width, samples.shape[0], experts.shape[0], len(caption))
    canvas, draw, font = new_canvas(canvas_w, canvas_h)
    grey = grey_rgb(np.asarray(scan, dtype=np.float32))
    draw.text((4, 5), title, fill=CAPTION, font=font)
    y = GRID_TITLE

    def row(tiles: list[tuple[str, np.ndarray | None]], y: int) -> int:
        for c, (name, _) in enumerate(tiles):
            draw.text((c * (tw + GRID_GAP) + 2, y + 1), name, fill=TEXT, font=font)
        paste_tiles(canvas, draw, font, [tile for _, tile in tiles], y + GRID_ROW_TITLE, tw, th, GRID_GAP)
        return y + GRID_ROW_TITLE + th + GRID_GAP

    first: list[tuple[str, np.ndarray | None]] = [("scan", grey)]
    for k in range(experts.shape[0]):
        colour = READER_COLOURS[k % len(READER_COLOURS)]
        first.append((f"reader {k + 1}", overlay(grey, experts[k], colour) if present[k] else None))
    if experts.shape[0] == 0:
        draw.text((tw + GRID_GAP + 4, y + GRID_ROW_TITLE + th // 2 - 5), "no readers' masks for this scan",
                  fill=TEXT, font=font)
    y = row(first, y)
    shown = min(GRID_SAMPLES, samples.shape[0])
    tiles = [(f"sample {i + 1} (expert {int(labels[i]) + 1})", overlay(grey, samples[i], SAMPLE_COLOUR))
             for i in range(shown)]
    for start in range(0, shown, GRID_COLUMNS):
        y = row(tiles[start:start + GRID_COLUMNS], y)

    # the maps, each heat map followed by its colour bar: mean, entropy of the mean, majority
    top = y + GRID_ROW_TITLE
    step = tw + GRID_GAP + GRID_BAR + GRID_GAP
    maps = (
        (f"mean of {samples.shape[0]} (frequency)", heat(mean), ((1.0, "1"), (0.5, "0.5"), (0.0, "0"))),
        ("entropy of the mean (bits)", heat(entropy), ((1.0, "1 bit"), (0.5, "0.5"), (0.0, "0"))),
        ("majority (> half)", overlay(grey, majority, MAJORITY_COLOUR), None),
    )
    for c, (name, picture, ticks) in enumerate(maps):
        x = c * step
        draw.text((x + 2, y + 1), name, fill=TEXT, font=font)
        canvas.paste(_tile(picture, tw, th), (x, top))
        if ticks is not None:
            draw_colour_bar(canvas, draw, font, x + tw + GRID_GAP, top, th, ticks)
    y += GRID_ROW_TITLE + th + GRID_GAP
    for k, line in enumerate(caption):
        draw.text((4, y + 14 * k), line, fill=CAPTION if k == 0 else TEXT, font=font)
    return _save_png(path, canvas)


def _tile(rgb: np.ndarray, tw: int, th: int):
    from PIL import Image

    return Image.fromarray(rgb).resize((tw, th), Image.NEAREST)


def heat_png(path: str | os.PathLike, values: np.ndarray) -> Path:
    """A heat map (values in [0, 1], one PNG pixel per scan pixel) through the grid's colour scale."""
    from PIL import Image

    return _save_png(path, Image.fromarray(heat(np.asarray(values, dtype=np.float64))))


def mask_png(path: str | os.PathLike, mask: np.ndarray) -> Path:
    """A binary mask as an 8-bit grey PNG (0 and 255), one PNG pixel per scan pixel."""
    from PIL import Image

    return _save_png(path, Image.fromarray((np.asarray(mask) > 0).astype(np.uint8) * 255))
