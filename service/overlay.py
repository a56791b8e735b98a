"""PNG preview of a segmentation: a few slices of the scan with the label map blended on top."""

from __future__ import annotations

import io

import numpy as np
import SimpleITK as sitk
from PIL import Image

PALETTE = np.array(
    [
        (0, 0, 0),
        (230, 25, 75),
        (60, 180, 75),
        (0, 130, 200),
        (255, 225, 25),
        (245, 130, 48),
        (145, 30, 180),
        (70, 240, 240),
        (240, 50, 230),
        (210, 245, 60),
    ],
    dtype=np.float32,
)
TILE = 256


def _slice_axis(image: sitk.Image) -> int:
    """Numpy axis (z, y, x order) of the coarsest spacing: the acquisition's slice axis."""
    spacing = image.GetSpacing()
    return 2 - int(np.argmax(spacing))


def _window(array: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(array, [1, 99])
    if hi <= lo:
        hi = lo + 1
    return np.clip((array - lo) / (hi - lo), 0, 1)


def render_overlay(image: sitk.Image, labels: sitk.Image, slices: int = 4, alpha: float = 0.45) -> bytes:
    """PNG bytes of ``slices`` slices (those with most structure first spread evenly) with labels overlaid."""
    vol = sitk.GetArrayFromImage(image).astype(np.float32)
    lab = sitk.GetArrayFromImage(labels).astype(np.int64)
    if vol.shape != lab.shape:
        raise ValueError(f"label map {lab.shape} does not match the scan {vol.shape}")
    axis = _slice_axis(image)
    vol, lab = np.moveaxis(vol, axis, 0), np.moveaxis(lab, axis, 0)
    with_labels = np.flatnonzero((lab > 0).reshape(lab.shape[0], -1).any(1))
    candidates = with_labels if len(with_labels) else np.arange(lab.shape[0])
    picks = candidates[
        np.unique(np.linspace(0, len(candidates) - 1, min(slices, len(candidates))).round().astype(int))
    ]
    spacing = list(image.GetSpacing())
    in_plane = [s for i, s in enumerate(reversed(spacing)) if i != axis]
    aspect = in_plane[0] / in_plane[1]
    tiles = []
    for k in picks:
        grey = _window(vol[k])[..., None] * 255.0
        colours = PALETTE[np.clip(lab[k], 0, len(PALETTE) - 1) % len(PALETTE)]
        mask = (lab[k] > 0)[..., None]
        rgb = np.where(mask, (1 - alpha) * grey + alpha * colours, np.repeat(grey, 3, axis=2))
        tile = Image.fromarray(rgb.astype(np.uint8), "RGB")
        height, width = rgb.shape[0] * aspect, rgb.shape[1]
        scale = TILE / max(height, width)
        tiles.append(
            tile.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.BILINEAR)
        )
    canvas = Image.new("RGB", (TILE * len(tiles), TILE))
    for i, tile in enumerate(tiles):
        canvas.paste(tile, (i * TILE + (TILE - tile.width) // 2, (TILE - tile.height) // 2))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()
