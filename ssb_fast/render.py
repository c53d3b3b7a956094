"""Mask pictures for people: a scan as grey RGB, masks drawn over it, heat maps, rows of titled tiles.

Shared by `ssb-fast data show` (the dataset montage) and `ssb-fast sample` (the per-case preview and
grid, whose heat maps carry a colour bar).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# Reader colours (RGB), cycled when there are more readers; samples get their own colour.
READER_COLOURS = ((230, 80, 60), (60, 160, 230), (90, 200, 90), (235, 190, 50), (200, 90, 220), (240, 140, 40))
SAMPLE_COLOUR = (70, 225, 225)
# A few stops of an inferno-like map (black, purple, orange, pale yellow) for probabilities and uncertainties.
HEAT_STOPS = np.array([[0, 0, 4], [120, 28, 109], [237, 105, 37], [252, 255, 164]], dtype=np.float64)
BACKGROUND, ABSENT, TEXT, CAPTION = (24, 24, 24), (60, 60, 60), (230, 230, 230), (255, 255, 120)


def grey_rgb(image: np.ndarray) -> np.ndarray:
    """(C, H, W) in [-1, 1] -> (H, W, 3) uint8 (first channel as grey, or the first three as RGB)."""
    chans = image[:3] if image.shape[0] >= 3 else np.repeat(image[:1], 3, axis=0)
    return np.clip((np.moveaxis(chans, 0, -1) + 1.0) * 127.5, 0, 255).astype(np.uint8)


def outline(mask: np.ndarray) -> np.ndarray:
    """The mask's boundary pixels (4-neighbourhood)."""
    inner = mask.copy()
    inner[1:, :] &= mask[:-1, :]
    inner[:-1, :] &= mask[1:, :]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return mask & ~inner


def overlay(grey: np.ndarray, mask: np.ndarray, colour) -> np.ndarray:
    """`mask` tinted over the (H, W, 3) grey picture, with its outline in full colour."""
    mask = mask.astype(bool)
    over = grey.astype(np.float32)
    colour = np.asarray(colour, dtype=np.float32)
    over[mask] = 0.55 * over[mask] + 0.45 * colour
    over[outline(mask)] = colour
    return over.astype(np.uint8)


def heat(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (H, W) -> (H, W, 3) uint8 through HEAT_STOPS."""
    stops = np.linspace(0.0, 1.0, len(HEAT_STOPS))
    v = np.clip(values, 0.0, 1.0)
    return np.stack([np.interp(v, stops, HEAT_STOPS[:, c]) for c in range(3)], -1).astype(np.uint8)


def paste_tiles(canvas, draw, font, tiles: Sequence[np.ndarray | None], y: int, tile_w: int, tile_h: int,
                gap: int) -> None:
    """Paste a row of (H, W, 3) tiles scaled to tile_w x tile_h at height y; None is an "absent" box."""
    from PIL import Image

    for c, tile in enumerate(tiles):
        x = c * (tile_w + gap)
        if tile is None:
            draw.rectangle([x, y, x + tile_w - 1, y + tile_h - 1], fill=ABSENT)
            draw.text((x + 4, y + tile_h // 2 - 5), "absent", fill=(200, 200, 200), font=font)
        else:
            canvas.paste(Image.fromarray(tile).resize((tile_w, tile_h), Image.NEAREST), (x, y))


def new_canvas(width: int, height: int):
    """(canvas, draw, font) for a dark RGB picture."""
    from PIL import Image, ImageDraw, ImageFont

    canvas = Image.new("RGB", (width, height), BACKGROUND)
    return canvas, ImageDraw.Draw(canvas), ImageFont.load_default()


def draw_colour_bar(canvas, draw, font, x: int, y: int, height: int, ticks: Sequence[tuple[float, str]],
                    width: int = 10) -> int:
    """A vertical HEAT_STOPS scale at (x, y), value 1 at the top and 0 at the bottom, with tick labels to
    its right; returns the x just past the labels."""
    from PIL import Image

    values = np.linspace(1.0, 0.0, max(height, 2))[:, None].repeat(width, axis=1)
    canvas.paste(Image.fromarray(heat(values)), (x, y))
    right = x + width
    for value, text in ticks:
        ty = y + round((1.0 - value) * (height - 1))
        draw.line([x + width, ty, x + width + 3, ty], fill=TEXT)
        label_y = min(max(ty - 5, y), y + height - 10)
        draw.text((x + width + 5, label_y), text, fill=TEXT, font=font)
        right = max(right, x + width + 5 + round(draw.textlength(text, font=font)))
    return right
