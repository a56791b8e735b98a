"""Training data: labelled and unlabelled scans from folders or a CSV, prepared on the model grid."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from models.io import IMAGE_SUFFIXES, case_name, read_image
from models.preprocessing import Normalisation, PreparedScan, labels_to_model_grid, prepare


@dataclass
class TrainingCase:
    """A prepared scan with its label array on the model grid (None when unlabelled)."""

    scan: PreparedScan
    labels: np.ndarray | None


def image_files(folder: str | Path) -> list[Path]:
    """Image files of a folder, sorted by name."""
    return sorted(p for p in Path(folder).iterdir() if p.name.lower().endswith(IMAGE_SUFFIXES))


def labelled_pairs(images: str | Path, labels: str | Path | None = None) -> list[tuple[Path, Path]]:
    """(image, label) pairs from an images folder + labels folder matched by file name, or from a CSV."""
    images = Path(images)
    if images.suffix == ".csv":
        with open(images, newline="") as fh:
            rows = list(csv.DictReader(fh))
        return [(Path(r["image"]), Path(r["label"])) for r in rows]
    if labels is None:
        raise ValueError("a labels folder is needed unless images is a CSV with image,label columns")
    pairs = []
    for img in image_files(images):
        lab = Path(labels) / img.name
        if not lab.exists():
            raise FileNotFoundError(f"no label map for {img.name} in {labels}")
        pairs.append((img, lab))
    return pairs


def load_case(
    image: Path, label: Path | None, spacing, normalisation: Normalisation, n_classes: int | None = None
) -> TrainingCase:
    """Prepare one case; label maps must share the image's grid and hold only known labels."""
    scan = prepare(read_image(image), case_name(image), spacing, normalisation)
    if label is None:
        return TrainingCase(scan, None)
    lab_img = sitk.ReadImage(str(label))
    if lab_img.GetSize() != scan.original.GetSize():
        raise ValueError(
            f"{label.name}: label size {lab_img.GetSize()} != image size {scan.original.GetSize()}"
        )
    lab_img.CopyInformation(scan.original)
    arr = labels_to_model_grid(lab_img, scan)
    if n_classes is not None and arr.max() >= n_classes:
        raise ValueError(f"{label.name}: label {int(arr.max())} outside 0..{n_classes - 1}")
    return TrainingCase(scan, arr)
