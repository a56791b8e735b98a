"""Global-local training views and 3D block masking, shared by the trainer and test-time adaptation."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F


def pad_to_patch(array: np.ndarray, patch: Sequence[int]) -> tuple[np.ndarray, tuple[slice, ...]]:
    """Pad (z, y, x) symmetrically to at least the patch size; return the padded array and the crop back."""
    pads, crop = [], []
    for n, p in zip(array.shape, patch, strict=True):
        total = max(0, p - n)
        before = total // 2
        pads.append((before, total - before))
        crop.append(slice(before, before + n))
    padded = (
        np.pad(array, pads, mode="constant", constant_values=float(array.min()))
        if any(sum(p) for p in pads)
        else array
    )
    return padded, tuple(crop)


def global_view(volume: torch.Tensor, patch: Sequence[int], z0: int = 0) -> torch.Tensor:
    """The whole volume (B, C, z, y, x) resampled to the patch grid.

    A patch one slice thick belongs to a slice-wise plan: its global view is the whole field of view of that
    slice (``z0``), not the scan squeezed into one slice.
    """
    return F.interpolate(
        global_extent(volume, patch, z0), size=tuple(patch), mode="trilinear", align_corners=False
    )


def global_extent(volume: torch.Tensor, patch: Sequence[int], z0: int = 0) -> torch.Tensor:
    """What the global view of a patch starting at slice ``z0`` covers: the whole volume, or for a patch one slice
    thick (a slice-wise plan) that slice."""
    return volume[:, :, z0 : z0 + 1] if patch[0] == 1 else volume


def box_of(starts: Sequence[int], patch: Sequence[int], shape: Sequence[int]) -> torch.Tensor:
    """Normalised box (z0, y0, x0, z1, y1, x1) in [0, 1] of a patch inside a volume of ``shape``."""
    lo = [s / n for s, n in zip(starts, shape, strict=True)]
    hi = [(s + p) / n for s, p, n in zip(starts, patch, shape, strict=True)]
    return torch.tensor(lo + hi, dtype=torch.float32)


@dataclass
class Views:
    """A batch of local patches with their global views and boxes; labels when the volumes had them."""

    local: torch.Tensor
    global_view: torch.Tensor
    box: torch.Tensor
    local_labels: torch.Tensor | None = None
    global_labels: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> Views:
        """The same views on ``device``."""
        values = (getattr(self, f.name) for f in fields(self))
        return Views(*(None if t is None else t.to(device) for t in values))


def patch_start(
    shape: Sequence[int], patch: Sequence[int], rng: np.random.Generator, centre=None
) -> list[int]:
    """Start of a patch inside ``shape``: around ``centre`` (z, y, x) when given, else uniformly random."""
    starts = []
    for i, (n, p) in enumerate(zip(shape, patch, strict=True)):
        hi = n - p
        if centre is None:
            starts.append(int(rng.integers(0, hi + 1)))
        else:
            starts.append(int(np.clip(centre[i] - p // 2 + rng.integers(-p // 4, p // 4 + 1), 0, hi)))
    return starts


def make_views(
    volumes: Sequence[np.ndarray],
    patch: Sequence[int],
    rng: np.random.Generator,
    *,
    labels: Sequence[np.ndarray] | None = None,
    foreground_prob: float = 0.0,
) -> Views:
    """One local patch + global view per volume; with labels, a patch is centred on foreground with some probability."""
    locs, gviews, boxes, llabs, glabs = [], [], [], [], []
    for i, vol in enumerate(volumes):
        padded, _ = pad_to_patch(vol, patch)
        centre = None
        if labels is not None:
            lab, _ = pad_to_patch(labels[i].astype(np.float32), patch)
            fg = np.argwhere(lab > 0)
            if len(fg) and rng.random() < foreground_prob:
                centre = fg[rng.integers(len(fg))]
        start = patch_start(padded.shape, patch, rng, centre)
        sl = tuple(slice(s, s + p) for s, p in zip(start, patch, strict=True))
        vt = torch.from_numpy(np.ascontiguousarray(padded))[None, None]
        locs.append(vt[(0, slice(None), *sl)])
        gviews.append(global_view(vt, patch, start[0])[0])
        boxes.append(box_of(start, patch, padded.shape))
        if labels is not None:
            lt = torch.from_numpy(np.ascontiguousarray(lab))[None, None]
            llabs.append(lt[(0, slice(None), *sl)].long())
            glabs.append(
                F.interpolate(global_extent(lt, patch, start[0]), size=tuple(patch), mode="nearest")[0].long()
            )
    return Views(
        torch.stack(locs),
        torch.stack(gviews),
        torch.stack(boxes),
        torch.stack(llabs) if llabs else None,
        torch.stack(glabs) if glabs else None,
    )


def block_mask(
    shape: Sequence[int], block: Sequence[int], ratio: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """A (B, 1, z, y, x) mask of ones with a ``ratio`` of 3D blocks set to zero (the masked part)."""
    b, _, *spatial = shape
    grid = [max(1, -(-n // k)) for n, k in zip(spatial, block, strict=True)]
    keep = (torch.rand((b, 1, *grid), generator=generator) >= ratio).float()
    up = keep.repeat_interleave(block[0], 2).repeat_interleave(block[1], 3).repeat_interleave(block[2], 4)
    return up[:, :, : spatial[0], : spatial[1], : spatial[2]]


def mirror_views(local: torch.Tensor, gview: torch.Tensor, box: torch.Tensor, axis: int):
    """Views (B, C, z, y, x) mirrored along spatial ``axis`` (0: z, 1: y, 2: x), with the patch's box mirrored
    inside the scan: the views of the same patch in the mirrored scan."""
    flipped = box.clone()
    flipped[:, axis], flipped[:, axis + 3] = 1 - box[:, axis + 3], 1 - box[:, axis]
    return local.flip(axis + 2), gview.flip(axis + 2), flipped


def mirror_randomly(views: Views, axes: Sequence[int], rng: np.random.Generator) -> Views:
    """``views`` with each one mirrored along each of ``axes`` with probability 1/2 (labels and boxes with it)."""
    local, gview, box = views.local.clone(), views.global_view.clone(), views.box.clone()
    llab = None if views.local_labels is None else views.local_labels.clone()
    glab = None if views.global_labels is None else views.global_labels.clone()
    for axis in axes:
        pick = torch.from_numpy(rng.random(len(box)) < 0.5)
        if not pick.any():
            continue
        local[pick], gview[pick], box[pick] = mirror_views(local[pick], gview[pick], box[pick], axis)
        if llab is not None and glab is not None:
            llab[pick], glab[pick] = llab[pick].flip(axis + 2), glab[pick].flip(axis + 2)
    return Views(local, gview, box, llab, glab)
