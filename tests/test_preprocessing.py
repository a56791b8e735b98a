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


def test_a_zero_slice_spacing_keeps_every_scans_own_slices(data_dir, tmp_path):
    from trainer.data import load_case, load_prepared, save_prepared, source_volume_ranges

    names = {0: "background", 1: "right ventricle cavity", 2: "myocardium", 3: "left ventricle cavity"}
    grid = {"spacing": (1.8, 1.8, 0.0), "normalisation": Normalisation(), "n_classes": 4}
    cases = []
    for domain, case in (("mscmr_lge", "subject1_lge"), ("mscmr_bssfp", "subject1_bssfp")):
        folder = data_dir / "cardiac" / domain
        image = read_image(folder / f"images/{case}.nii.gz")
        scan = prepare(image, case, grid["spacing"], Normalisation())
        assert scan.reference.GetSpacing()[2] == pytest.approx(image.GetSpacing()[2])
        assert scan.array.shape[0] == image.GetSize()[2]  # no slice interpolated, none dropped
        labels = sitk.ReadImage(str(folder / f"labels/{case}.nii.gz"))
        on_model = labels_to_model_grid(labels, scan)
        one_hot = np.stack([(on_model == k).astype(np.float32) for k in range(4)])
        back = sitk.GetArrayFromImage(label_image(probabilities_to_original(one_hot, scan).argmax(0), image))
        ref = sitk.GetArrayFromImage(labels)
        for k in (1, 2, 3):  # only in-plane resampling (through 8 mm slices LGE's RV keeps 0.86)
            assert (
                2 * np.logical_and(ref == k, back == k).sum() / ((ref == k).sum() + (back == k).sum()) > 0.95
            )
        cases.append(load_case(folder / f"images/{case}.nii.gz", folder / f"labels/{case}.nii.gz", **grid))
    assert cases[0].voxel_ml == pytest.approx(1.8 * 1.8 * 5.0 / 1000, rel=0.02)  # LGE: 5 mm slices
    assert cases[1].voxel_ml == pytest.approx(1.8 * 1.8 * 7.99 / 1000, rel=0.02)  # bSSFP: 8 mm slices
    path = save_prepared(cases, tmp_path / "d.npz", grid["spacing"], Normalisation())
    loaded = load_prepared(path, grid["spacing"], Normalisation())
    assert [c.voxel_ml for c in loaded] == [c.voxel_ml for c in cases]
    # the same heart in both sequences: volumes on their own slice grids agree within a quarter
    lv = [source_volume_ranges([c], names)["left ventricle cavity"][0] for c in loaded]
    assert lv[0] == pytest.approx(lv[1], rel=0.25)
