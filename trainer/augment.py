"""Augmentation of whole prepared volumes with MONAI transforms, before global-local views are cut."""

from __future__ import annotations

import numpy as np
from monai.transforms import (
    Compose,
    RandAdjustContrastd,
    RandBiasFieldd,
    RandFlipd,
    RandGaussianNoised,
    RandRotate90d,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandZoomd,
)


def training_augmentation(seed: int = 0) -> Compose:
    """In-plane flips and 90-degree rotations (sites differ in orientation), scaling, gamma, noise, bias field."""
    keys, img = ["image", "label"], ["image"]
    aug = Compose(
        [
            RandFlipd(keys, prob=0.5, spatial_axis=1),
            RandFlipd(keys, prob=0.5, spatial_axis=2),
            RandRotate90d(keys, prob=0.5, max_k=3, spatial_axes=(1, 2)),
            RandZoomd(
                keys,
                prob=0.3,
                min_zoom=(1.0, 0.85, 0.85),
                max_zoom=(1.0, 1.2, 1.2),
                mode=("trilinear", "nearest"),
                keep_size=True,
            ),
            RandBiasFieldd(img, prob=0.3, coeff_range=(0.0, 0.3)),
            RandAdjustContrastd(img, prob=0.5, gamma=(0.6, 1.6)),
            RandScaleIntensityd(img, prob=0.3, factors=0.2),
            RandShiftIntensityd(img, prob=0.3, offsets=0.2),
            RandGaussianNoised(img, prob=0.2, std=0.1),
        ]
    )
    aug.set_random_state(seed)
    return aug


def augment(
    aug: Compose, image: np.ndarray, label: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Apply ``aug`` to an image (z, y, x) and its label map (same transform); returns numpy arrays."""
    lab = label if label is not None else np.zeros_like(image, dtype=np.int64)
    out = aug({"image": image[None].astype(np.float32), "label": lab[None].astype(np.float32)})
    image_out = np.asarray(out["image"][0], dtype=np.float32)
    label_out = np.asarray(out["label"][0]).round().astype(np.int64) if label is not None else None
    return image_out, label_out
