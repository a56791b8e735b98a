"""Label-free plausibility guard: an adapted prediction that departs implausibly from the source falls back."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from pydantic import BaseModel

VolumeRanges = dict[str, tuple[float, float]]


class GuardConfig(BaseModel):
    """Thresholds of the guard; volumes in millilitres."""

    min_volume_ml: float = 1.0
    max_volume_factor: float = 3.0
    consolidation_margin: float = 0.1


def structure_volumes(labels: np.ndarray, names: dict[int, str], voxel_ml: float) -> dict[str, float]:
    """Volume in mL of every non-background structure of a label map."""
    counts = np.bincount(labels.ravel(), minlength=max(names) + 1)
    return {names[k]: round(float(counts[k]) * voxel_ml, 3) for k in sorted(names) if k != 0}


def volume_ranges(label_maps: Iterable[tuple[np.ndarray, float]], names: dict[int, str]) -> VolumeRanges:
    """(smallest, largest) volume in mL of every structure over label maps, each with the volume of its voxels
    (e.g. the source labels)."""
    per_map = [structure_volumes(labels, names, voxel_ml) for labels, voxel_ml in label_maps]
    if not per_map:
        return {}
    return {name: (min(v[name] for v in per_map), max(v[name] for v in per_map)) for name in per_map[0]}


def implausible_change(
    source: dict[str, float],
    adapted: dict[str, float],
    *,
    cfg: GuardConfig | None = None,
    connectedness: tuple[float, float] | None = None,
    source_ranges: VolumeRanges | None = None,
) -> str | None:
    """Why the adapted volumes are implausible against the source's, or None when they are plausible.

    A structure that vanishes is always implausible. A volume change beyond ``max_volume_factor`` is implausible
    unless it repairs the segmentation:
    - ``connectedness`` (source, adapted) is the fraction of the foreground in its largest connected component;
      a rise of ``consolidation_margin`` or more means the adaptation replaced scattered look-alike blobs by one
      organ;
    - ``source_ranges`` (the model card's range of each structure's volume in the source training labels): a
      structure whose source volume lies outside the range anatomy allows and whose adapted volume lies inside
      it was mis-sized by the source model and fixed by the adaptation.
    """
    cfg = cfg or GuardConfig()
    source_ranges = source_ranges or {}
    consolidated = (
        connectedness is not None and connectedness[1] >= connectedness[0] + cfg.consolidation_margin
    )
    for name, v_src in source.items():
        v_ad = adapted.get(name, 0.0)
        if v_src >= cfg.min_volume_ml and v_ad < cfg.min_volume_ml:
            return f"{name} vanished after adaptation ({v_src:.1f} mL -> {v_ad:.1f} mL)"
        lo, hi = source_ranges.get(name, (-np.inf, np.inf))
        resized_into_range = not lo <= v_src <= hi and lo <= v_ad <= hi
        if (
            v_src >= cfg.min_volume_ml
            and not consolidated
            and not resized_into_range
            and not (v_src / cfg.max_volume_factor <= v_ad <= v_src * cfg.max_volume_factor)
        ):
            return (
                f"{name} volume changed beyond x{cfg.max_volume_factor:g} ({v_src:.1f} mL -> {v_ad:.1f} mL)"
            )
    return None


def dice_per_class(a: np.ndarray, b: np.ndarray, n_classes: int) -> list[float]:
    """Dice of every foreground class between two label maps; NaN where the class is absent from both."""
    scores = []
    for k in range(1, n_classes):
        x, y = a == k, b == k
        denom = x.sum() + y.sum()
        scores.append(float(2.0 * np.logical_and(x, y).sum() / denom) if denom else float("nan"))
    return scores


def dice_agreement(a: np.ndarray, b: np.ndarray, n_classes: int) -> float:
    """Mean foreground Dice between two label maps (agreement, not accuracy); 1.0 when both are empty."""
    present = [d for d in dice_per_class(a, b, n_classes) if not np.isnan(d)]
    return float(np.mean(present)) if present else 1.0
