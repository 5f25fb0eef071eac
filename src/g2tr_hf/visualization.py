"""Pictures of a reduction: which tokens of an image were kept (the look of the paper's Fig. 5)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


__all__ = ["draw_kept_tokens"]


def _pixel_to_cell(size: int, cells: int) -> np.ndarray:
    """Token index along one axis for each pixel along that axis (tokens tile the image evenly)."""
    return (np.arange(size) * cells) // size


def draw_kept_tokens(
    image: Image.Image,
    grid: tuple[int, int],
    keep: torch.Tensor,
    *,
    dropped_brightness: float = 0.2,
    grid_lines: bool = True,
) -> Image.Image:
    """Overlay a keep set on an image: kept tokens at full brightness, dropped tokens darkened.

    Args:
        image: the image the tokens were computed from (any size; the (h, w) token grid is stretched over it).
        grid: (h, w) token grid, row-major.
        keep: LongTensor [K] of kept token indices.
        dropped_brightness: brightness factor for dropped tokens, in [0, 1].
        grid_lines: draw the token grid in a faint line.
    Returns:
        An RGB `PIL.Image` of the same size as `image`.
    """
    if not 0.0 <= dropped_brightness <= 1.0:
        raise ValueError(f"`dropped_brightness` must be in [0, 1], got {dropped_brightness!r}.")
    h, w = grid
    kept = np.zeros(h * w, dtype=bool)
    kept[keep.detach().cpu().numpy()] = True
    kept = kept.reshape(h, w)

    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    rows = _pixel_to_cell(pixels.shape[0], h)
    cols = _pixel_to_cell(pixels.shape[1], w)
    kept_pixels = kept[rows[:, None], cols[None, :]]
    shaded = np.where(kept_pixels[..., None], pixels, pixels * dropped_brightness)
    if grid_lines:
        row_edges = np.r_[False, rows[1:] != rows[:-1]]
        col_edges = np.r_[False, cols[1:] != cols[:-1]]
        edges = row_edges[:, None] | col_edges[None, :]
        shaded[edges] = 0.7 * shaded[edges] + 0.3 * 255.0
    return Image.fromarray(shaded.clip(0, 255).astype(np.uint8))
