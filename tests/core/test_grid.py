import numpy as np
import pytest
from PIL import Image, ImageFont

from driftscope_core import grid
from driftscope_core.grid import DEFAULT_LAYOUT, GridRow, difference_map, render_grid


def _noise(h, w, seed=0):
    return np.random.default_rng(seed).random((h, w, 3), dtype=np.float32)


def _row(label="dog", h=8, w=8, seed=0):
    base = _noise(h, w, seed)
    return GridRow(label=label, caption="drift 0.0123  z=8.1", base=base, adapted=_noise(h, w, seed + 1))


def _diff_cell(img: Image.Image, cell_w: int, cell_h: int) -> np.ndarray:
    """Crop the difference cell of the last row: rightmost column, bottom of the grid."""
    arr = np.asarray(img)  # (H, W, 3)
    pad = DEFAULT_LAYOUT.padding
    bottom, right = arr.shape[0] - pad, arr.shape[1] - pad
    column = arr[:, right - cell_w : right]
    # the last row's images are pasted at the top of the row; the row may be taller than the cell
    non_bg = np.flatnonzero((column != 255).any(axis=(1, 2)))
    top = int(non_bg[non_bg < bottom].max()) + 1 - cell_h
    return column[top : top + cell_h]


def test_difference_map_identical_is_black():
    img = _noise(16, 16)
    out = difference_map(img, img.copy())
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    assert not out.any()


def test_difference_map_bright_where_different():
    base = np.zeros((10, 10, 3), dtype=np.uint8)
    adapted = base.copy()
    adapted[:, :5] = 200  # left half differs
    out = difference_map(base, adapted)
    assert (out[:, :5] == 255).all()  # the pair's max difference is white
    assert not out[:, 5:].any()


def test_difference_map_accepts_float_and_uint8_mix():
    base = np.full((4, 4, 3), 0.5, dtype=np.float32)
    adapted = np.full((4, 4, 3), 128, dtype=np.uint8)
    assert difference_map(base, adapted).max() == 255  # tiny but nonzero diff, scaled up
    assert not difference_map(base, base).any()


def test_difference_map_shape_mismatch_raises():
    with pytest.raises(ValueError):
        difference_map(_noise(8, 8), _noise(8, 9))


def test_grid_grows_with_rows():
    one = render_grid([_row()])
    three = render_grid([_row(seed=i) for i in range(3)])
    assert one.mode == "RGB" and three.mode == "RGB"
    assert three.width == one.width
    assert three.height > one.height


def test_title_adds_height():
    assert render_grid([_row()], title="my lora").height > render_grid([_row()]).height


def test_difference_column_black_for_identical_images():
    img = np.full((8, 8, 3), 0.5, dtype=np.float32)
    out = render_grid([GridRow("same", "drift 0", img, img.copy())])
    cell = _diff_cell(out, 128, 128)
    assert cell.shape == (128, 128, 3)
    assert not cell.any()


def test_difference_column_bright_where_images_differ():
    base = np.zeros((8, 8, 3), dtype=np.float32)
    adapted = base.copy()
    adapted[:, :4] = 1.0  # left half differs
    out = render_grid([_row(seed=5), GridRow("changed", "drift 1", base, adapted)])
    cell = _diff_cell(out, 128, 128)
    assert (cell[:, :64] == 255).all()
    assert not cell[:, 64:].any()


def test_tiny_8x8_images_are_scaled_up():
    out = render_grid([_row(h=8, w=8)])
    assert out.height >= DEFAULT_LAYOUT.min_short_side
    assert out.width >= 3 * DEFAULT_LAYOUT.min_short_side


def test_mixed_sizes_are_resized_to_first_row():
    rows = [_row(h=16, w=16), _row(h=40, w=24, seed=3), _row(h=7, w=300, seed=7)]
    rows.append(GridRow("uint8", "x", np.zeros((20, 20, 3), np.uint8), np.full((20, 20, 3), 255, np.uint8)))
    out = render_grid(rows)
    assert out.mode == "RGB"
    assert out.height > render_grid(rows[:1]).height


def test_large_image():
    img = np.zeros((1024, 1024, 3), dtype=np.uint8)
    out = render_grid([GridRow("big", "drift 0", img, img)])
    assert out.width > 3 * 1024 and out.height > 1024


def test_unicode_and_long_labels_do_not_crash():
    rows = [
        _row(label="犬 🐶 café \u200b\n\ttab"),
        _row(label="x" * 500, seed=2),
        GridRow("", "", _noise(8, 8), _noise(8, 8, 1)),
    ]
    assert render_grid(rows, title="タイトル " * 50).mode == "RGB"


def test_fallback_bitmap_font(monkeypatch):
    def no_sized_font(size=None):
        if size is not None:
            raise OSError("no FreeType")
        return ImageFont.load_default_imagefont()

    monkeypatch.setattr(grid.ImageFont, "load_default", no_sized_font)
    rows = [_row(label="犬 🐶 café … " + "y" * 200)]
    assert render_grid(rows, title="タイトル").mode == "RGB"


def test_long_label_is_truncated_with_ellipsis():
    font = grid._load_font(14)
    fitted = grid._fit_text("a" * 500, font, 100)
    assert fitted.endswith("\u2026") and font.getlength(fitted) <= 100


def test_empty_rows_raise():
    with pytest.raises(ValueError, match="at least one"):
        render_grid([])


def test_difference_column_uses_one_scale_for_all_rows():
    """A row that barely changed must look dark next to a row that changed a lot."""
    from driftscope_core.grid import DEFAULT_LAYOUT, GridRow, render_grid
    base = np.zeros((16, 16, 3), dtype=np.float32)
    big, small = base + 1.0, base + 0.01
    grid = np.asarray(render_grid([GridRow("big", "", base, big), GridRow("small", "", base, small)]))
    # the difference cells are the right-most square cells; compare the brightest pixel of each row's cell
    w = grid.shape[1]
    cell = DEFAULT_LAYOUT.min_short_side
    x0 = w - DEFAULT_LAYOUT.padding - cell
    column = grid[:, x0 : x0 + cell].astype(int).sum(axis=2)  # (H, cell)
    dark = np.where((column.max(axis=1) > 0) & (column.max(axis=1) < 100))[0]
    assert len(dark) >= cell // 2  # the "small" row is nearly black, not stretched to white
