"""Connected-component clean-up of predicted label maps, and how connected and how certain a prediction is."""

from __future__ import annotations

from enum import StrEnum

import numpy as np
from scipy import ndimage


class LargestComponent(StrEnum):
    """Which connected components of a label map to keep."""

    off = "off"
    foreground = "foreground"  # the largest object formed by all structures together (e.g. one heart)
    structures = "structures"  # the largest component of each structure


def foreground_connectedness(labels: np.ndarray) -> float:
    """Fraction of the segmented foreground in its largest 3D connected component (1 = one organ, no strays).

    A model that fails on a scan tends to scatter the structures over look-alike tissue; one that works draws
    one connected organ.
    """
    components, n = ndimage.label(labels > 0)
    if n == 0:
        return 0.0
    sizes = np.bincount(components.ravel())[1:]
    return float(sizes.max() / sizes.sum())


def keep_largest_component(labels: np.ndarray, n_classes: int, mode: LargestComponent) -> np.ndarray:
    """``labels`` with every voxel outside the kept components set to background."""
    if mode == LargestComponent.off:
        return labels
    from monai.transforms import KeepLargestConnectedComponent  # heavy import, only when used

    keep = KeepLargestConnectedComponent(
        applied_labels=list(range(1, n_classes)), independent=mode == LargestComponent.structures
    )
    return np.asarray(keep(labels[None].copy()))[0].astype(labels.dtype)  # MONAI edits its input in place


def normalised_entropy(probs: np.ndarray) -> np.ndarray:
    """Voxel-wise entropy of class probabilities (C, ...), scaled to [0, 1]."""
    return -(probs * np.log(np.clip(probs, 1e-8, None))).sum(0) / np.log(probs.shape[0])


def foreground_entropy(probs: np.ndarray) -> float:
    """Mean :func:`normalised_entropy` of class probabilities (C, ...) over the voxels whose argmax is a
    structure; 0 when there are none."""
    fg = probs.argmax(0) > 0
    return float(normalised_entropy(probs)[fg].mean()) if fg.any() else 0.0
