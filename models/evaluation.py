"""Dice, HD95 and ASSD per structure (MONAI metrics) of predicted label maps against reference labels, and each
structure's predicted volume as a share of its reference volume (above 1: over-segmented)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from monai.metrics import compute_average_surface_distance, compute_dice, compute_hausdorff_distance
from monai.networks.utils import one_hot

from models.io import IMAGE_SUFFIXES, case_name

METRICS = ("dice", "hd95", "assd", "volume_ratio")


def evaluate_case(pred: sitk.Image, ref: sitk.Image, labels: dict[int, str]) -> dict[str, dict[str, float]]:
    """Per structure: Dice, HD95 and ASSD in mm, and the predicted volume over the reference volume (NaN where
    the reference lacks the structure); on the reference grid, which the prediction must share."""
    if pred.GetSize() != ref.GetSize():
        raise ValueError(f"prediction size {pred.GetSize()} != label size {ref.GetSize()}")
    n = max(labels) + 1
    p = one_hot(torch.from_numpy(sitk.GetArrayFromImage(pred).astype(np.int64))[None, None], n)
    r = one_hot(torch.from_numpy(sitk.GetArrayFromImage(ref).astype(np.int64))[None, None], n)
    spacing = ref.GetSpacing()[::-1]  # array axes are (z, y, x)
    dice = compute_dice(p, r, include_background=False, ignore_empty=True)[0]
    hd95 = compute_hausdorff_distance(p, r, include_background=False, percentile=95, spacing=spacing)[0]
    assd = compute_average_surface_distance(p, r, include_background=False, symmetric=True, spacing=spacing)[
        0
    ]
    pred_voxels, ref_voxels = p[0, 1:].sum(dim=(1, 2, 3)), r[0, 1:].sum(dim=(1, 2, 3))
    volume_ratio = torch.where(ref_voxels > 0, pred_voxels / ref_voxels.clamp_min(1), torch.nan)
    values = dict(zip(METRICS, (dice, hd95, assd, volume_ratio), strict=True))  # channel k - 1 is label k
    return {labels[k]: {m: float(v[k - 1]) for m, v in values.items()} for k in sorted(labels) if k != 0}


def evaluate_folders(pred_dir: str | Path, label_dir: str | Path, labels: dict[int, str]) -> dict:
    """Evaluate every prediction that has a reference label of the same case name; means per structure."""
    refs = {case_name(p): p for p in Path(label_dir).iterdir() if p.name.lower().endswith(IMAGE_SUFFIXES)}
    cases = {}
    for p in sorted(Path(pred_dir).iterdir()):
        name = case_name(p)
        if p.name.lower().endswith(IMAGE_SUFFIXES) and name in refs and not name.endswith("_uncertainty"):
            cases[name] = evaluate_case(sitk.ReadImage(str(p)), sitk.ReadImage(str(refs[name])), labels)
    if not cases:
        raise ValueError(f"no prediction in {pred_dir} matches a label in {label_dir} by case name")
    structures = [labels[k] for k in sorted(labels) if k != 0]
    mean = {s: {m: float(np.nanmean([c[s][m] for c in cases.values()])) for m in METRICS} for s in structures}
    mean["mean"] = {m: float(np.nanmean([mean[s][m] for s in structures])) for m in METRICS}
    return {"cases": cases, "mean": mean}
