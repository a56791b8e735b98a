"""Resampling to the model grid and back: outputs sit exactly on the input's grid, oblique headers included."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from models.io import read_image, same_grid
from models.preprocessing import (
    Normalisation,
    label_image,
    labels_to_model_grid,
    prepare,
    probabilities_to_original,
)


@pytest.mark.parametrize("case", ["subject1_lge", "subject29_lge"])
def test_label_round_trip_on_real_oblique_headers(data_dir, case):
    image = read_image(data_dir / f"cardiac/mscmr_lge/images/{case}.nii.gz")
    labels = sitk.ReadImage(str(data_dir / f"cardiac/mscmr_lge/labels/{case}.nii.gz"))
    scan = prepare(image, case, (1.8, 1.8, 8.0), Normalisation())
    assert scan.reference.GetDirection() == image.GetDirection()
    on_model = labels_to_model_grid(labels, scan)
    one_hot = np.stack([(on_model == k).astype(np.float32) for k in range(4)])
    back = label_image(probabilities_to_original(one_hot, scan).argmax(0), scan.original)
    assert same_grid(back, image)
    ref, out = sitk.GetArrayFromImage(labels), sitk.GetArrayFromImage(back)
    for k in (1, 2, 3):
        dice = 2 * np.logical_and(ref == k, out == k).sum() / ((ref == k).sum() + (out == k).sum())
        assert dice > 0.75, (k, dice)


def test_model_grid_keeps_physical_extent(data_dir):
    image = read_image(data_dir / "cardiac/mscmr_bssfp/images/subject10_bssfp.nii.gz")
    scan = prepare(image, "s", (1.8, 1.8, 8.0), Normalisation())
    centre = lambda im: im.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in im.GetSize()])  # noqa: E731
    assert np.allclose(centre(image), centre(scan.reference), atol=1.0)
    assert scan.array.dtype == np.float32
    assert abs(float(scan.array.mean())) < 0.1 and abs(float(scan.array.std()) - 1) < 0.1


def test_ct_window_normalisation():
    out = Normalisation(kind="ct", window=(-100, 100)).apply(np.array([-500.0, 0.0, 500.0]))
    assert out.tolist() == [-1.0, 0.0, 1.0]
