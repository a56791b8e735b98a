"""Synthetic labelled phantoms and a tiny trained bundle, for fast tests and demos without real data."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import SimpleITK as sitk

from models.network_config import NetworkConfig

if TYPE_CHECKING:
    from models.bundle import Bundle

PHANTOM_LABELS = {0: "background", 1: "core", 2: "shell"}
PHANTOM_SPACING = (1.5, 1.5, 3.0)
PHANTOM_PATCH = (8, 32, 32)
PHANTOM_NETWORK = NetworkConfig(
    out_channels=3,
    channels=(8, 16, 32),
    kernels=((1, 3, 3), (3, 3, 3), (3, 3, 3)),
    strides=((1, 1, 1), (1, 2, 2), (2, 2, 2)),
)


def phantom(
    seed: int, size: tuple[int, int, int] = (48, 44, 12), spacing=PHANTOM_SPACING, shift: str = "none"
) -> tuple[sitk.Image, sitk.Image]:
    """An ellipsoidal core inside a shell in a noisy background; returns (image, labels) with (x, y, z) ``size``.

    ``shift="noise"`` renders it as a noisier scanner would (noise std 0.25 instead of 0.06 of the core's signal).
    """
    rng = np.random.default_rng(seed)
    nx, ny, nz = size
    z, y, x = np.meshgrid(
        np.arange(nz) * spacing[2], np.arange(ny) * spacing[1], np.arange(nx) * spacing[0], indexing="ij"
    )
    c = [
        nz * spacing[2] / 2,
        ny * spacing[1] / 2 + rng.uniform(-6, 6),
        nx * spacing[0] / 2 + rng.uniform(-6, 6),
    ]
    r = rng.uniform(9, 13)
    d = np.sqrt(((z - c[0]) / 1.6) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2)
    labels = np.zeros(d.shape, np.uint8)
    labels[d < r + 6] = 2
    labels[d < r] = 1
    img = np.choose(labels, [0.2, 1.0, 0.55]).astype(np.float32)
    img += rng.normal(0, 0.25 if shift == "noise" else 0.06, img.shape).astype(np.float32)
    image = sitk.GetImageFromArray((img * 1000).astype(np.int16))
    image.SetSpacing(spacing)
    lab = sitk.GetImageFromArray(labels)
    lab.CopyInformation(image)
    return image, lab


def write_phantoms(folder: str | Path, n: int, seed: int = 0, shift: str = "none") -> list[tuple[Path, Path]]:
    """Write ``n`` phantoms as NIfTI into ``folder/images`` and ``folder/labels``."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "labels").mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        image, lab = phantom(seed + i, shift=shift)
        ip, lp = folder / "images" / f"case{i:02d}.nii.gz", folder / "labels" / f"case{i:02d}.nii.gz"
        sitk.WriteImage(image, str(ip))
        sitk.WriteImage(lab, str(lp))
        out.append((ip, lp))
    return out


def save_untrained_bundle(folder: str | Path, seed: int = 0) -> Bundle:
    """An untrained bundle of the phantom architecture in ``folder`` (seconds to make): for tests of files
    and plumbing, not of segmentation quality."""
    import torch

    from models.bundle import ModelCard, save_bundle
    from models.network import GlobalLocalUNet

    torch.manual_seed(seed)
    card = ModelCard(
        name="phantom",
        version="1",
        labels=PHANTOM_LABELS,
        target_spacing=PHANTOM_SPACING,
        patch_size=PHANTOM_PATCH,
        description="untrained, for tests",
    )
    return save_bundle(GlobalLocalUNet(PHANTOM_NETWORK), card, folder)
