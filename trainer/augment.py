"""Augmentation of whole prepared volumes with MONAI transforms, before global-local views are cut."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import (
    Compose,
    MapTransform,
    RandAdjustContrastd,
    RandBiasFieldd,
    RandFlipd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandHistogramShiftd,
    RandomizableTransform,
    RandRotate90d,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandZoomd,
)
from scipy.ndimage import gaussian_filter, map_coordinates

from trainer.config import RECIPE_ZOOM, RECIPE_ZOOM_PROB


class RandomConvolutionIntensityd(RandomizableTransform, MapTransform):
    """Global intensity non-linear augmentation (GIN, Ouyang et al., MedIA 2022).

    A freshly drawn shallow network of random in-plane convolutions and leaky ReLUs remaps the intensities and
    local texture of the scan while keeping its shapes; the result is blended with the original by a random
    factor and re-standardised. It teaches the source model that appearance (bSSFP, LGE, another vendor) is not
    what defines a structure.
    """

    def __init__(self, keys, prob: float = 0.5, layers: int = 4, width: int = 2, slope: float = 0.2) -> None:
        MapTransform.__init__(self, keys)
        RandomizableTransform.__init__(self, prob)
        self.layers, self.width, self.slope = layers, width, slope

    def __call__(self, data: dict) -> dict:
        self.randomize(None)
        if not self._do_transform:
            return data
        out = dict(data)
        for key in self.key_iterator(out):
            image = torch.as_tensor(np.asarray(out[key]), dtype=torch.float32)[None]  # (1, 1, z, y, x)
            h = image
            for i in range(self.layers):
                c_out = 1 if i == self.layers - 1 else self.width
                k = int(self.R.choice([1, 3]))
                weight = torch.from_numpy(self.R.standard_normal((c_out, h.shape[1], 1, k, k))).float()
                bias = torch.from_numpy(self.R.standard_normal(c_out) * 0.1).float()
                h = F.conv3d(h, weight, bias, padding=(0, k // 2, k // 2))
                if i < self.layers - 1:
                    h = F.leaky_relu(h, self.slope)
            h = (h - h.mean()) / h.std().clamp_min(1e-6)
            alpha = float(self.R.uniform(0.0, 1.0))
            mixed = alpha * h + (1.0 - alpha) * image
            out[key] = ((mixed - mixed.mean()) / mixed.std().clamp_min(1e-6))[0].numpy()
        return out


class RandLocationScaled(RandomizableTransform, MapTransform):
    """Location-scale intensity augmentation, global and per structure (GLA and LLA of SLAug, Su et al., AAAI 2023).

    The scan is scaled to [0, 1] and remapped by a random Bezier curve, increasing or (with ``invert_prob``)
    decreasing, then by a random gain and offset. With ``local_prob`` every labelled structure and the background
    get their own curve, gain and offset instead, blended across structure borders by a smoothed mask, so the
    network cannot rely on how bright one tissue is relative to another, as LGE and bSSFP disagree there.
    """

    def __init__(
        self,
        keys,
        label_key: str = "label",
        prob: float = 0.5,
        local_prob: float = 0.5,
        invert_prob: float = 0.3,
        n_classes: int = 4,
    ) -> None:
        MapTransform.__init__(self, keys)
        RandomizableTransform.__init__(self, prob)
        self.label_key, self.local_prob, self.invert_prob, self.n_classes = (
            label_key,
            local_prob,
            invert_prob,
            n_classes,
        )

    def _curve(self, x: np.ndarray) -> np.ndarray:
        """A random Bezier remapping of [0, 1] (endpoints fixed, two random control points), gain and offset."""
        p1, p2 = self.R.uniform(0, 1, 2), self.R.uniform(0, 1, 2)
        t = np.linspace(0, 1, 256)
        bx = 3 * (1 - t) ** 2 * t * p1[0] + 3 * (1 - t) * t**2 * p2[0] + t**3
        by = 3 * (1 - t) ** 2 * t * p1[1] + 3 * (1 - t) * t**2 * p2[1] + t**3
        order = np.argsort(bx)
        y = np.interp(x, bx[order], by[order])
        if self.R.random() < self.invert_prob:
            y = 1.0 - y
        return y * self.R.uniform(0.7, 1.3) + self.R.uniform(-0.2, 0.2)

    def __call__(self, data: dict) -> dict:
        self.randomize(None)
        if not self._do_transform:
            return data
        out = dict(data)
        labels = np.asarray(out[self.label_key])[0] if self.label_key in out else None
        local = labels is not None and labels.any() and self.R.random() < self.local_prob
        for key in self.key_iterator(out):
            image = np.asarray(out[key], dtype=np.float32)
            lo, hi = float(image.min()), float(image.max())
            x = (image - lo) / max(hi - lo, 1e-6)
            if local:
                weights = [
                    gaussian_filter((labels == c).astype(np.float32), sigma=(0, 1, 1))
                    for c in range(self.n_classes)
                ]
                total = np.maximum(sum(weights), 1e-6)
                mapped = sum(w * self._curve(x[0]) for w in weights) / total
                mapped = mapped[None]
            else:
                mapped = self._curve(x)
            out[key] = ((mapped - mapped.mean()) / max(float(mapped.std()), 1e-6)).astype(np.float32)
        return out


class RandRadialContractiond(RandomizableTransform, MapTransform):
    """Contraction of the structures around one of them, slice by slice: a heart drawn towards end-systole.

    In every slice that holds ``centre_label``, the point at distance ``r`` from that structure's centroid shows
    what lay at ``R (r / R) ** p`` (``p`` drawn once per scan from ``power``, below one), where ``R`` is ``reach``
    times the distance of the farthest labelled voxel; beyond ``R`` nothing moves. The centre structure shrinks
    most and the ones around it thicken, as a ventricle's cavity and wall do in systole; a scan whose labelled
    phases are all end-diastolic otherwise never shows its network a contracted heart.
    """

    def __init__(
        self,
        keys,
        centre_label: int,
        label_key: str = "label",
        prob: float = 0.0,
        power: tuple[float, float] = (0.6, 0.9),
        reach: float = 1.3,
    ) -> None:
        MapTransform.__init__(self, keys)
        RandomizableTransform.__init__(self, prob)
        self.centre_label, self.label_key, self.power, self.reach = centre_label, label_key, power, reach

    def __call__(self, data: dict) -> dict:
        self.randomize(None)
        if not self._do_transform or self.label_key not in data:
            return data
        p = float(self.R.uniform(*self.power))
        labels = np.asarray(data[self.label_key])[0]
        out = dict(data)
        arrays = {k: np.array(out[k], dtype=np.float32) for k in self.key_iterator(out)}
        yy, xx = np.indices(labels.shape[1:], dtype=np.float64)
        for z, plane in enumerate(labels):
            centre = np.argwhere(plane == self.centre_label)
            if not len(centre):
                continue
            cy, cx = centre.mean(axis=0)
            dy, dx = yy - cy, xx - cx
            r = np.hypot(dy, dx)
            radius = self.reach * float(r[plane > 0].max())
            scale = np.ones_like(r)
            inside = (r > 0) & (r < radius)
            scale[inside] = (r[inside] / radius) ** (p - 1.0)
            coords = np.stack([cy + dy * scale, cx + dx * scale])
            for key, array in arrays.items():
                order = 0 if key == self.label_key else 1
                array[0, z] = map_coordinates(array[0, z], coords, order=order, mode="nearest")
        out.update(arrays)
        return out


def _spatial(
    zoom: tuple[float, float] = RECIPE_ZOOM, zoom_prob: float = RECIPE_ZOOM_PROB
) -> list[MapTransform]:
    """In-plane flips, 90-degree rotations (sites differ in orientation) and, with ``zoom_prob``, in-plane scaling
    by a factor drawn from ``zoom``, of image and label map."""
    keys = ["image", "label"]
    return [
        RandFlipd(keys, prob=0.5, spatial_axis=1),
        RandFlipd(keys, prob=0.5, spatial_axis=2),
        RandRotate90d(keys, prob=0.5, max_k=3, spatial_axes=(1, 2)),
        RandZoomd(
            keys,
            prob=zoom_prob,
            min_zoom=(1.0, zoom[0], zoom[0]),
            max_zoom=(1.0, zoom[1], zoom[1]),
            mode=("trilinear", "nearest"),
            keep_size=True,
        ),
    ]


def weak_augmentation(
    seed: int = 0, zoom: tuple[float, float] = RECIPE_ZOOM, zoom_prob: float = RECIPE_ZOOM_PROB
) -> Compose:
    """The spatial part of :func:`training_augmentation` alone (by default its scaling too): the weak view of a
    scan whose labels a teacher gives, which keeps its own appearance, as a scan at test time does."""
    aug = Compose(_spatial(zoom, zoom_prob))
    aug.set_random_state(seed)
    return aug


def training_augmentation(
    seed: int = 0,
    random_convolution_prob: float = 0.0,
    histogram_shift_prob: float = 0.0,
    location_scale_prob: float = 0.0,
    n_classes: int = 4,
    contraction_prob: float = 0.0,
    contraction_label: int = 0,
) -> Compose:
    """In-plane flips and 90-degree rotations (sites differ in orientation), scaling, gamma, noise, bias field;
    with the given probabilities, radial contraction around ``contraction_label``, random-convolution remapping,
    random monotonic histogram curves and global or per-structure location-scale remapping."""
    img = ["image"]
    # contraction only when asked for, so that the other transforms' random streams stay the recipe's
    contraction = (
        [RandRadialContractiond(["image", "label"], contraction_label, prob=contraction_prob)]
        if contraction_prob > 0
        else []
    )
    aug = Compose(
        [
            *_spatial(),
            *contraction,
            RandLocationScaled(img, prob=location_scale_prob, n_classes=n_classes),
            RandomConvolutionIntensityd(img, prob=random_convolution_prob),
            RandHistogramShiftd(img, num_control_points=(4, 12), prob=histogram_shift_prob),
            RandBiasFieldd(img, prob=0.3, coeff_range=(0.0, 0.3)),
            RandAdjustContrastd(img, prob=0.5, gamma=(0.6, 1.6)),
            RandScaleIntensityd(img, prob=0.3, factors=0.2),
            RandShiftIntensityd(img, prob=0.3, offsets=0.2),
            RandGaussianNoised(img, prob=0.2, std=0.1),
        ]
    )
    aug.set_random_state(seed)
    return aug


def strong_augmentation(seed: int = 0) -> Compose:
    """Appearance-only perturbation of an already augmented scan (brightness, contrast, blur, noise): the
    student's strong view of an unlabelled scan, on the same grid as the teacher's weak view."""
    img = ["image"]
    aug = Compose(
        [
            RandScaleIntensityd(img, prob=0.8, factors=0.3),
            RandShiftIntensityd(img, prob=0.8, offsets=0.3),
            RandAdjustContrastd(img, prob=0.8, gamma=(0.5, 2.0)),
            # MONAI names the spatial axes x, y, z in array order: here slices, rows, columns
            RandGaussianSmoothd(img, prob=0.5, sigma_x=(0.0, 0.5), sigma_y=(0.5, 1.5), sigma_z=(0.5, 1.5)),
            RandGaussianNoised(img, prob=0.3, std=0.1),
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
