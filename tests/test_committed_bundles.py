"""The committed source bundles: verified, resolvable by name, never trained on their test target, accurate."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from models.bundle import bundle_folders, load_bundle, resolve_bundle
from models.guard import dice_per_class
from models.io import same_grid
from models.pipeline import segment_batch
from models.postprocessing import foreground_connectedness

TEST_TARGET = {"cardiac-bssfp": "lge", "cardiac-acdc": "bssfp"}


@pytest.mark.parametrize("folder", bundle_folders(), ids=lambda folder: folder.name)
def test_bundle_card_and_provenance(folder):
    bundle = load_bundle(folder)  # every folder with a model card: a corrupt bundle fails here
    card = bundle.card
    name = card.name
    assert resolve_bundle(name).path == folder
    assert card.validation["dice_mean"] > 0.8  # held-out source scans; see docs/benchmarks.md
    # the reference of mpl's shift gate, on the same held-out cases (ttaseg record-entropy)
    assert 0.05 < card.validation["foreground_entropy"] < 0.3
    assert card.labels == {
        0: "background",
        1: "right ventricle cavity",
        2: "left ventricle myocardium",
        3: "left ventricle cavity",
    }
    seen = card.training["train_cases"] + card.training["val_cases"]
    assert not [c for c in seen if TEST_TARGET[name] in c], "a bundle must not have seen its test target"
    assert bundle.onnx_path.stat().st_size < 10 * 2**20
    assert card.largest_component == "foreground"  # the three structures form one heart
    # the guard's anatomy prior: every structure's volume range over the training labels, in mL
    ranges = card.label_volumes_ml
    assert set(ranges) == set(card.labels.values()) - {"background"}
    assert all(5.0 < lo < hi < 600.0 for lo, hi in ranges.values())


def test_in_domain_segmentation_of_a_held_out_scan(data_dir, tmp_path):
    bundle = resolve_bundle("cardiac-bssfp")
    case = bundle.card.training["val_cases"][0]
    image = data_dir / "cardiac/mscmr_bssfp/images" / f"{case}.nii.gz"
    result = segment_batch([image], bundle, tmp_path, method="none")[0]
    pred = sitk.ReadImage(str(result.label_path))
    ref = sitk.ReadImage(str(data_dir / "cardiac/mscmr_bssfp/labels" / f"{case}.nii.gz"))
    assert same_grid(pred, sitk.ReadImage(str(image)))
    p, r = sitk.GetArrayFromImage(pred), sitk.GetArrayFromImage(ref)
    dice = dice_per_class(p, r, 4)
    assert np.mean(dice) > 0.7, dice
    assert foreground_connectedness(p) == 1.0  # the card's clean-up keeps one heart
