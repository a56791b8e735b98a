"""From a scan on its own grid to the network's grid and back, exactly.

Arrays are (z, y, x) as SimpleITK returns them. The model grid keeps the scan's origin and direction and changes
only the spacing, so the inverse is a resampling onto the original image's grid. A target spacing of 0 on an axis
keeps each scan's own spacing there (a slice-wise plan that never interpolates between slices).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from pydantic import BaseModel, NonNegativeFloat

# x, y, z in mm; 0 on an axis keeps each scan's own spacing on it
Spacing = tuple[NonNegativeFloat, NonNegativeFloat, NonNegativeFloat]


class Normalisation(BaseModel):
    """Intensity normalisation: percentile clip + z-score for MR, a fixed window for CT."""

    kind: str = "mr"
    lower_percentile: float = 0.5
    upper_percentile: float = 99.5
    window: tuple[float, float] = (-1000.0, 1000.0)

    def apply(self, array: np.ndarray) -> np.ndarray:
        """Normalise a volume to roughly zero mean and unit variance (float32)."""
        a = array.astype(np.float32, copy=False)
        if self.kind == "ct":
            lo, hi = self.window
            return ((np.clip(a, lo, hi) - lo) / (hi - lo) * 2.0 - 1.0).astype(np.float32)
        lo, hi = np.percentile(a, [self.lower_percentile, self.upper_percentile])
        a = np.clip(a, lo, hi)
        std = float(a.std())
        return ((a - float(a.mean())) / (std if std > 1e-8 else 1.0)).astype(np.float32)


@dataclass
class PreparedScan:
    """A scan resampled and normalised for the network, with what is needed to map results back."""

    case: str
    original: sitk.Image
    reference: sitk.Image
    array: np.ndarray

    @property
    def voxel_ml(self) -> float:
        """Volume of one voxel of the original grid in millilitres."""
        return float(np.prod(self.original.GetSpacing())) / 1000.0

    @property
    def model_voxel_ml(self) -> float:
        """Volume of one voxel of the model grid in millilitres."""
        return float(np.prod(self.reference.GetSpacing())) / 1000.0


def model_grid(image: sitk.Image, target_spacing: Sequence[float]) -> sitk.Image:
    """An empty image with the scan's origin and direction and the target spacing (the scan's own on axes where it
    is 0), covering the same extent."""
    spacing = np.asarray(image.GetSpacing(), dtype=float)
    target = np.asarray(target_spacing, dtype=float)
    target = np.where(target > 0, target, spacing)
    size = np.maximum(1, np.round(np.asarray(image.GetSize()) * spacing / target)).astype(int)
    ref = sitk.Image([int(s) for s in size], sitk.sitkFloat32)
    ref.SetSpacing([float(t) for t in target])
    ref.SetDirection(image.GetDirection())
    # align the extents' centres so the resampled volume covers the same physical box
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    shift = direction @ ((target - spacing) / 2.0)
    ref.SetOrigin([float(o) for o in np.asarray(image.GetOrigin()) + shift])
    return ref


def resample_to(image: sitk.Image, reference: sitk.Image, interpolator: int = sitk.sitkLinear) -> sitk.Image:
    """Resample ``image`` onto the grid of ``reference``."""
    return sitk.Resample(image, reference, sitk.Transform(), interpolator, 0.0, image.GetPixelID())


def prepare(
    image: sitk.Image, case: str, target_spacing: Sequence[float], normalisation: Normalisation
) -> PreparedScan:
    """Resample to the target spacing and normalise intensities."""
    ref = model_grid(image, target_spacing)
    resampled = resample_to(sitk.Cast(image, sitk.sitkFloat32), ref)
    array = normalisation.apply(sitk.GetArrayFromImage(resampled))
    return PreparedScan(case=case, original=image, reference=ref, array=array)


def labels_to_model_grid(labels: sitk.Image, scan: PreparedScan) -> np.ndarray:
    """Nearest-neighbour resampling of a label map onto a prepared scan's model grid."""
    out = resample_to(sitk.Cast(labels, sitk.sitkUInt8), scan.reference, sitk.sitkNearestNeighbor)
    return sitk.GetArrayFromImage(out).astype(np.int64)


def probabilities_to_original(probs: np.ndarray, scan: PreparedScan) -> np.ndarray:
    """Map class probabilities (C, z, y, x) on the model grid to the original grid (linear per class)."""
    out = []
    for channel in probs:
        img = sitk.GetImageFromArray(channel.astype(np.float32))
        img.CopyInformation(scan.reference)
        moved = sitk.Resample(img, scan.original, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
        out.append(sitk.GetArrayFromImage(moved))
    stacked = np.stack(out)
    # voxels outside the model grid's extent get background
    stacked[0][stacked.sum(0) < 1e-6] = 1.0
    return stacked


def label_image(labels: np.ndarray, like: sitk.Image) -> sitk.Image:
    """A uint8 label map on exactly the grid and header geometry of ``like``."""
    img = sitk.GetImageFromArray(labels.astype(np.uint8))
    img.CopyInformation(like)
    return img
