"""Intermediate samples between labelled and unlabelled scans (UST-RUN, Ma et al., IEEE TMI 2025).

Unified copy-paste pastes a box of one scan into another, in both directions, and mixes their labels (or
pseudo-labels) the same way; the random-amplitude MixUp moves the low-frequency amplitude spectrum of the pasted
scan towards that of the scan it is pasted into, by a random share that grows with training progress. Scans
are arrays (z, y, x) on the model grid; :func:`aligned_views` cuts the same global-local views out of scans that
share a grid, so that the teacher's labels of one intermediate sample line up with another's.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from models.sampling import Views, box_of, global_view, pad_to_patch, patch_start


def fit_to(array: np.ndarray, shape: Sequence[int], fill: float) -> np.ndarray:
    """``array`` centre-cropped or padded with ``fill`` to ``shape``: the same voxel size, the same centre."""
    out = np.full(tuple(shape), fill, dtype=array.dtype)
    src, dst = [], []
    for n, m in zip(array.shape, shape, strict=True):
        keep = min(n, m)
        a, b = (n - keep) // 2, (m - keep) // 2
        src.append(slice(a, a + keep))
        dst.append(slice(b, b + keep))
    out[tuple(dst)] = array[tuple(src)]
    return out


def cutmix_box(
    shape: Sequence[int], rng: np.random.Generator, area: tuple[float, float], aspect: tuple[float, float]
) -> np.ndarray:
    """A (z, y, x) mask of ones in an in-plane box through all slices, zeros elsewhere.

    The box covers a random ``area`` share of a slice with a random height/width ratio within ``aspect``.
    """
    _, h, w = shape
    mask = np.zeros(tuple(shape), np.float32)
    size = rng.uniform(*area) * h * w
    ratio = float(np.exp(rng.uniform(np.log(aspect[0]), np.log(aspect[1]))))
    bh = int(np.clip(round(np.sqrt(size * ratio)), 1, h))
    bw = int(np.clip(round(np.sqrt(size / ratio)), 1, w))
    y, x = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
    mask[:, y : y + bh, x : x + bw] = 1.0
    return mask


def amplitude_mix(image: np.ndarray, style: np.ndarray, share: float, band: float) -> np.ndarray:
    """``image`` with the low-frequency part of its amplitude spectrum moved ``share`` of the way to ``style``'s.

    Both are (z, y, x) on one grid; the low frequencies are the centred window of half-width ``band`` times each
    axis length (at least the zero frequency). The phase, and with it the anatomy, stays ``image``'s. Both are
    shifted by their common minimum first, so that normalised scans (mean near zero) keep their sign.
    """
    offset = min(
        float(image.min()), float(style.min())
    )  # non-negative scans: the zero frequency's phase is 0
    spectrum = np.fft.fftshift(np.fft.fftn(image - offset))
    target = np.abs(np.fft.fftshift(np.fft.fftn(style - offset)))
    amplitude, phase = np.abs(spectrum), np.angle(spectrum)
    window = tuple(slice(n // 2 - int(n * band), n // 2 + int(n * band) + 1) for n in image.shape)
    amplitude[window] = (1 - share) * amplitude[window] + share * target[window]
    mixed = np.fft.ifftn(np.fft.ifftshift(amplitude * np.exp(1j * phase)))
    return (np.real(mixed) + offset).astype(np.float32)


def paste(base: np.ndarray, other: np.ndarray, box: np.ndarray) -> np.ndarray:
    """``base`` with ``other`` inside ``box`` (ones) and itself elsewhere."""
    return np.where(box > 0, other, base).astype(base.dtype)


def aligned_views(
    stacks: Sequence[Sequence[np.ndarray]],
    patch: Sequence[int],
    rng: np.random.Generator,
    *,
    maps: Sequence[bool],
    centres: Sequence[np.ndarray | None] | None = None,
) -> list[Views]:
    """The same local patch and global view of every array in each stack: one :class:`Views` per position.

    ``stacks[i]`` holds arrays of one grid; view ``k`` of the result batches the ``k``-th array of every stack.
    ``maps[k]`` says whether position ``k`` holds label maps or masks, whose global view is nearest-neighbour
    (images: trilinear). A patch lies around ``centres[i]`` (z, y, x) when given, else anywhere.
    """
    locals_: list[list[torch.Tensor]] = [[] for _ in maps]
    globals_: list[list[torch.Tensor]] = [[] for _ in maps]
    boxes = []
    for i, stack in enumerate(stacks):
        padded = [pad_to_patch(a.astype(np.float32), patch)[0] for a in stack]
        start = patch_start(padded[0].shape, patch, rng, None if centres is None else centres[i])
        sl = tuple(slice(s, s + p) for s, p in zip(start, patch, strict=True))
        boxes.append(box_of(start, patch, padded[0].shape))
        for k, (a, is_map) in enumerate(zip(padded, maps, strict=True)):
            t = torch.from_numpy(np.ascontiguousarray(a))[None, None]
            locals_[k].append(t[(0, slice(None), *sl)])
            g = F.interpolate(t, size=tuple(patch), mode="nearest") if is_map else global_view(t, patch)
            globals_[k].append(g[0])
    box = torch.stack(boxes)
    return [
        Views(torch.stack(loc), torch.stack(glob), box) for loc, glob in zip(locals_, globals_, strict=True)
    ]
