"""Dice, HD95 and ASSD per structure (MONAI metrics) of predicted label maps against reference labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from monai.metrics import compute_average_surface_distance, compute_dice, compute_hausdorff_distance
from monai.networks.utils import one_hot

from models.io import IMAGE_SUFFIXES, case_name


def evaluate_case(pred: sitk.Image, ref: sitk.Image, labels: dict[int, str]) -> dict[str, dict[str, float]]:
    """Metrics per structure in mm (on the reference grid; the prediction must share it)."""
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
    out = {}
    for i, k in enumerate(k for k in sorted(labels) if k != 0):
        out[labels[k]] = {"dice": float(dice[i]), "hd95": float(hd95[i]), "assd": float(assd[i])}
    return out


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
    mean = {
        s: {m: float(np.nanmean([c[s][m] for c in cases.values()])) for m in ("dice", "hd95", "assd")}
        for s in structures
    }
    mean["mean"] = {m: float(np.nanmean([mean[s][m] for s in structures])) for m in ("dice", "hd95", "assd")}
    return {"cases": cases, "mean": mean}
