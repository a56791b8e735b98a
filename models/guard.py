"""Label-free plausibility guard: an adapted prediction that departs implausibly from the source falls back."""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel


class GuardConfig(BaseModel):
    """Thresholds of the guard; volumes in millilitres."""

    min_volume_ml: float = 1.0
    max_volume_factor: float = 3.0
    consolidation_margin: float = 0.1


def structure_volumes(labels: np.ndarray, names: dict[int, str], voxel_ml: float) -> dict[str, float]:
    """Volume in mL of every non-background structure of a label map."""
    counts = np.bincount(labels.ravel(), minlength=max(names) + 1)
    return {names[k]: round(float(counts[k]) * voxel_ml, 3) for k in sorted(names) if k != 0}


def implausible_change(
    source: dict[str, float],
    adapted: dict[str, float],
    cfg: GuardConfig | None = None,
    connectedness: tuple[float, float] | None = None,
) -> str | None:
    """Why the adapted volumes are implausible against the source's, or None when they are plausible.

    A structure that vanishes is always implausible. A volume change beyond ``max_volume_factor`` is implausible
    unless it consolidates the segmentation: ``connectedness`` (source, adapted) is the fraction of the
    foreground in its largest connected component, and a rise of ``consolidation_margin`` or more means the
    adaptation replaced scattered look-alike blobs by one organ, the change a failing source model needs.
    """
    cfg = cfg or GuardConfig()
    consolidated = (
        connectedness is not None and connectedness[1] >= connectedness[0] + cfg.consolidation_margin
    )
    for name, v_src in source.items():
        v_ad = adapted.get(name, 0.0)
        if v_src >= cfg.min_volume_ml and v_ad < cfg.min_volume_ml:
            return f"{name} vanished after adaptation ({v_src:.1f} mL -> {v_ad:.1f} mL)"
        if (
            v_src >= cfg.min_volume_ml
            and not consolidated
            and not (v_src / cfg.max_volume_factor <= v_ad <= v_src * cfg.max_volume_factor)
        ):
            return (
                f"{name} volume changed beyond x{cfg.max_volume_factor:g} ({v_src:.1f} mL -> {v_ad:.1f} mL)"
            )
    return None


def dice_agreement(a: np.ndarray, b: np.ndarray, n_classes: int) -> float:
    """Mean foreground Dice between two label maps (agreement, not accuracy); 1.0 when both are empty."""
    scores = []
    for k in range(1, n_classes):
        x, y = a == k, b == k
        denom = x.sum() + y.sum()
        if denom:
            scores.append(2.0 * np.logical_and(x, y).sum() / denom)
    return float(np.mean(scores)) if scores else 1.0
