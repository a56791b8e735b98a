"""Training data: labelled and unlabelled scans from folders, a CSV or a prepared dataset, on the model grid."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from models.guard import VolumeRanges, volume_ranges
from models.io import IMAGE_SUFFIXES, case_name, read_image
from models.preprocessing import Normalisation, labels_to_model_grid, prepare


@dataclass
class TrainingCase:
    """A scan resampled and normalised on the model grid, with its label array (None when unlabelled) and the
    volume of one of its voxels (mL; per scan when the grid keeps the scans' own slice spacing)."""

    case: str
    image: np.ndarray
    labels: np.ndarray | None
    voxel_ml: float


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
    image: Path,
    label: Path | None,
    *,
    spacing: Sequence[float],
    normalisation: Normalisation,
    n_classes: int | None = None,
) -> TrainingCase:
    """Prepare one case; label maps must share the image's grid and hold only known labels."""
    scan = prepare(read_image(image), case_name(image), spacing, normalisation)
    if label is None:
        return TrainingCase(scan.case, scan.array, None, scan.model_voxel_ml)
    lab_img = sitk.ReadImage(str(label))
    if lab_img.GetSize() != scan.original.GetSize():
        raise ValueError(
            f"{label.name}: label size {lab_img.GetSize()} != image size {scan.original.GetSize()}"
        )
    lab_img.CopyInformation(scan.original)
    arr = labels_to_model_grid(lab_img, scan)
    if n_classes is not None and arr.max() >= n_classes:
        raise ValueError(f"{label.name}: label {int(arr.max())} outside 0..{n_classes - 1}")
    return TrainingCase(scan.case, scan.array, arr, scan.model_voxel_ml)


def load_cases(
    images: Path,
    labels: Path | None,
    names: dict[int, str] | None,
    spacing: Sequence[float],
    normalisation: Normalisation,
) -> list[TrainingCase]:
    """Cases from a prepared ``.npz`` (``ttaseg prepare``), a folder of images (+ labels) or a CSV; without
    ``names`` a folder's scans load unlabelled."""
    if images.suffix == ".npz":
        return load_prepared(images, spacing, normalisation)
    grid = {"spacing": spacing, "normalisation": normalisation}
    if names is None:
        return [load_case(f, None, **grid) for f in image_files(images)]
    return [load_case(i, lab, **grid, n_classes=len(names)) for i, lab in labelled_pairs(images, labels)]


def save_prepared(
    cases: Sequence[TrainingCase], path: str | Path, spacing: Sequence[float], normalisation: Normalisation
) -> Path:
    """Write prepared cases to one ``.npz`` that trains anywhere without the source files (or SimpleITK).

    Images are quantised to 8 bits over each scan's range (error at most 1/510 of it), which keeps a
    dataset small enough to ship to a training machine.
    """
    ranges = [(float(c.image.min()), float(c.image.max())) for c in cases]
    meta = {
        "cases": [c.case for c in cases],
        "labelled": [c.labels is not None for c in cases],
        "ranges": ranges,
        "voxel_ml": [c.voxel_ml for c in cases],
        "target_spacing": [float(s) for s in spacing],
        "normalisation": normalisation.model_dump(mode="json"),
    }
    arrays = {
        f"image_{i}": np.round((c.image - lo) / max(hi - lo, 1e-6) * 255).astype(np.uint8)
        for i, (c, (lo, hi)) in enumerate(zip(cases, ranges, strict=True))
    }
    arrays |= {f"labels_{i}": c.labels.astype(np.uint8) for i, c in enumerate(cases) if c.labels is not None}
    path = Path(path)
    np.savez_compressed(path, meta=np.array(json.dumps(meta)), **arrays)
    return path


def load_prepared(
    path: str | Path, spacing: Sequence[float], normalisation: Normalisation
) -> list[TrainingCase]:
    """Cases from :func:`save_prepared`; refuses a dataset prepared for another grid or normalisation."""
    with np.load(path) as data:
        meta = json.loads(str(data["meta"]))
        if meta["target_spacing"] != [float(s) for s in spacing] or meta["normalisation"] != (
            normalisation.model_dump(mode="json")
        ):
            raise ValueError(
                f"{path} was prepared for spacing {meta['target_spacing']} and {meta['normalisation']}; "
                f"training needs {list(spacing)} and {normalisation.model_dump(mode='json')}"
            )
        # files prepared before per-scan voxel volumes were kept have one fixed grid
        fixed = float(np.prod(meta["target_spacing"])) / 1000.0
        voxels = meta.get("voxel_ml", [fixed] * len(meta["cases"]))
        return [
            TrainingCase(
                case,
                data[f"image_{i}"].astype(np.float32) * np.float32(max(hi - lo, 1e-6) / 255) + np.float32(lo),
                data[f"labels_{i}"].astype(np.int64) if labelled else None,
                voxel_ml,
            )
            for i, (case, labelled, (lo, hi), voxel_ml) in enumerate(
                zip(meta["cases"], meta["labelled"], meta["ranges"], voxels, strict=True)
            )
        ]


def source_volume_ranges(cases: Sequence[TrainingCase], names: dict[int, str]) -> VolumeRanges:
    """Smallest and largest volume (mL, model grid) of each structure over the labelled cases, for the card."""
    return volume_ranges([(c.labels, c.voxel_ml) for c in cases if c.labels is not None], names)
