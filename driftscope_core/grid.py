"""Evidence grid: one labeled row per token showing base | adapted | difference map."""

from __future__ import annotations

import math
import unicodedata
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont


@dataclass(frozen=True)
class GridRow:
    """One token's evidence: label, caption and the two images to compare."""

    label: str  # e.g. the token text, "dog"
    caption: str  # e.g. "drift 0.0123  z=8.1"; "\n" starts a new caption line
    base: np.ndarray  # (H, W, 3) float in [0, 1] or uint8
    adapted: np.ndarray  # same shape as base


@dataclass(frozen=True)
class GridLayout:
    """Layout constants of the grid, in pixels unless noted."""

    min_short_side: int = 128  # smaller images are scaled up (NEAREST) to reach this
    padding: int = 8  # gap around and between all cells
    line_gap: int = 4  # vertical gap between text lines
    font_px_min: int = 14
    caption_px_min: int = 12
    font_px_max: int = 36
    font_px_per_cell_px: float = 1 / 16  # font size grows with the cell's short side
    caption_scale: float = 0.85  # caption font size relative to the label font
    title_scale: float = 1.25  # title font size relative to the label font
    label_column_em: float = 12.0  # label column width in label-font sizes
    background: tuple[int, int, int] = (255, 255, 255)
    text_color: tuple[int, int, int] = (20, 20, 20)
    caption_color: tuple[int, int, int] = (90, 90, 90)


DEFAULT_LAYOUT = GridLayout()


def _as_float_rgb(image: np.ndarray) -> np.ndarray:
    """Return an (H, W, 3) float32 copy in [0, 1]; uint8/integer input is read as 0..255."""
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = arr[:, :, None]  # (H, W) -> (H, W, 1)
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4) or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"expected an (H, W, 3) image array, got shape {arr.shape}")
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)  # grey (H, W, 1) -> (H, W, 3)
    elif arr.shape[2] == 4:
        arr = arr[:, :, :3]  # drop alpha: (H, W, 4) -> (H, W, 3)
    if arr.dtype == np.bool_ or np.issubdtype(arr.dtype, np.floating):
        out = arr.astype(np.float32)
    elif np.issubdtype(arr.dtype, np.integer):
        out = arr.astype(np.float32) / 255.0
    else:
        raise ValueError(f"unsupported image dtype {arr.dtype}")
    return np.clip(np.nan_to_num(out, nan=0.0, posinf=1.0, neginf=0.0), 0.0, 1.0)


def _resize_float(arr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize an (H, W, 3) float image to size=(width, height) without 8-bit quantisation."""
    if (arr.shape[1], arr.shape[0]) == size:
        return arr
    channels = [
        np.asarray(Image.fromarray(np.ascontiguousarray(arr[:, :, c])).resize(size, Image.Resampling.BILINEAR))
        for c in range(3)
    ]
    return np.clip(np.stack(channels, axis=2), 0.0, 1.0)  # 3 x (h, w) -> (h, w, 3)


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    return np.round(arr * 255.0).astype(np.uint8)


def _abs_difference(base: np.ndarray, adapted: np.ndarray) -> np.ndarray:
    """|base - adapted| (H, W) averaged over channels."""
    a, b = _as_float_rgb(base), _as_float_rgb(adapted)
    if a.shape != b.shape:
        raise ValueError(f"base and adapted must have the same shape, got {a.shape} and {b.shape}")
    return np.abs(a - b).mean(axis=2)  # (H, W, 3) -> (H, W)


def difference_map(base: np.ndarray, adapted: np.ndarray, peak: float | None = None) -> np.ndarray:
    """Heat map (H, W, 3) uint8 of |base - adapted| averaged over channels.

    A difference of `peak` (default: this pair's largest) is white (black -> red -> yellow ->
    white); identical images give an all-black map. The grid passes one peak for all rows, so
    rows compare: an unchanged word stays dark next to a drifted one.
    """
    diff = _abs_difference(base, adapted)
    peak = float(diff.max()) if peak is None else float(peak)
    level = np.clip(diff / peak, 0.0, 1.0) if peak > 0.0 else np.zeros_like(diff)
    heat = np.stack(  # 3 x (H, W) -> (H, W, 3), "hot" colour ramp
        [np.clip(3.0 * level - k, 0.0, 1.0) for k in (0.0, 1.0, 2.0)], axis=2
    )
    return _to_uint8(heat)


def _load_font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's built-in font at `size`, or its fixed-size bitmap font on older/limited Pillow."""
    try:
        return ImageFont.load_default(size=size)
    except Exception:  # TypeError on Pillow < 10.1, OSError/ImportError without FreeType
        return ImageFont.load_default()


def _clean_text(text: str, font) -> str:
    """Make `text` drawable as one line: control characters become spaces, and for the
    bitmap fallback font (Latin-1 only) unencodable characters become "?"."""
    text = "".join(" " if unicodedata.category(ch).startswith("C") else ch for ch in str(text))
    if not isinstance(font, ImageFont.FreeTypeFont):
        text = text.encode("latin-1", "replace").decode("latin-1")
    return text


def _fit_text(text: str, font, max_width: int) -> str:
    """Clean `text` and truncate it with an ellipsis so it is at most `max_width` px wide."""
    text = _clean_text(text, font)
    if font.getlength(text) <= max_width:
        return text
    ellipsis = "\u2026" if isinstance(font, ImageFont.FreeTypeFont) else "..."
    lo, hi = 0, len(text)  # longest prefix that fits, by bisection
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if font.getlength(text[:mid].rstrip() + ellipsis) <= max_width:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo].rstrip() + ellipsis if font.getlength(ellipsis) <= max_width else ""


def _line_height(font) -> int:
    left, top, right, bottom = font.getbbox("Ag\u00c9y|")
    return int(math.ceil(bottom))


def render_grid(
    rows: Sequence[GridRow],
    title: str = "",
    column_titles: Sequence[str] = ("base", "adapted", "difference"),
) -> Image.Image:
    """Render the evidence grid as an RGB image: one row per GridRow, a header with the
    column titles (and optional title) and a left column with each row's label and caption.

    Every row is resized to the first row's base size; small images are enlarged with
    NEAREST so the short side is at least `GridLayout.min_short_side` px.
    """
    rows = list(rows)
    if not rows:
        raise ValueError("render_grid needs at least one GridRow, got an empty sequence")
    lay = DEFAULT_LAYOUT
    ref_h, ref_w = _as_float_rgb(rows[0].base).shape[:2]
    scale = max(1, math.ceil(lay.min_short_side / min(ref_h, ref_w)))
    cell_w, cell_h = ref_w * scale, ref_h * scale

    font_px = int(round(min(cell_w, cell_h) * lay.font_px_per_cell_px))
    font_px = max(lay.font_px_min, min(lay.font_px_max, font_px))
    label_font = _load_font(font_px)
    caption_font = _load_font(max(lay.caption_px_min, round(font_px * lay.caption_scale)))
    title_font = _load_font(round(font_px * lay.title_scale))
    label_lh, caption_lh, title_lh = (_line_height(f) for f in (label_font, caption_font, title_font))

    label_w = int(round(font_px * lay.label_column_em))
    pad = lay.padding
    width = pad + label_w + 3 * (pad + cell_w) + pad
    title_h = title_lh + pad if title else 0
    header_h = label_lh + pad

    pairs = [(_resize_float(_as_float_rgb(r.base), (ref_w, ref_h)), _resize_float(_as_float_rgb(r.adapted), (ref_w, ref_h)))
             for r in rows]
    shared_peak = max(float(_abs_difference(b, a).max()) for b, a in pairs)  # one scale for every row

    def cell_images(pair) -> list[Image.Image]:
        base, adapted = pair
        arrays = (_to_uint8(base), _to_uint8(adapted), difference_map(base, adapted, shared_peak))
        return [Image.fromarray(a).resize((cell_w, cell_h), Image.Resampling.NEAREST) for a in arrays]

    row_texts, row_heights = [], []
    for row in rows:
        captions = [_fit_text(line, caption_font, label_w) for line in str(row.caption).splitlines()]
        text_h = label_lh + len(captions) * (lay.line_gap + caption_lh)
        row_texts.append((_fit_text(row.label, label_font, label_w), captions))
        row_heights.append(max(cell_h, text_h))

    height = pad + title_h + header_h + sum(h + pad for h in row_heights)
    canvas = Image.new("RGB", (width, height), lay.background)
    draw = ImageDraw.Draw(canvas)

    y = pad
    if title:
        draw.text((pad, y), _fit_text(title, title_font, width - 2 * pad), font=title_font, fill=lay.text_color)
        y += title_h
    col_x = [pad + label_w + pad + i * (cell_w + pad) for i in range(3)]
    for x, name in zip(col_x, column_titles):
        draw.text((x, y), _fit_text(name, label_font, cell_w), font=label_font, fill=lay.text_color)
    y += header_h

    for pair, (label, captions), row_h in zip(pairs, row_texts, row_heights):
        draw.text((pad, y), label, font=label_font, fill=lay.text_color)
        text_y = y + label_lh
        for line in captions:
            text_y += lay.line_gap
            draw.text((pad, text_y), line, font=caption_font, fill=lay.caption_color)
            text_y += caption_lh
        for x, img in zip(col_x, cell_images(pair)):
            canvas.paste(img, (x, y))
        y += row_h + pad
    return canvas
