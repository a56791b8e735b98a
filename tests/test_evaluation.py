import math

import numpy as np
import SimpleITK as sitk

from models.evaluation import evaluate_case


def _image(array: np.ndarray) -> sitk.Image:
    img = sitk.GetImageFromArray(array.astype(np.uint8))
    img.SetSpacing((1.0, 1.0, 2.0))
    return img


def test_each_label_is_scored_on_its_own_channel_with_its_volume_ratio():
    ref = np.zeros((4, 16, 16))
    ref[1:3, 2:4, 2:4] = 1  # 8 voxels
    ref[1:3, 8:12, 8:12] = 4  # 32 voxels; label 4 with no 2 or 3 between
    pred = ref.copy()
    pred[1:3, 2:4, 4:6] = 1  # label 1 twice its reference volume
    names = {0: "background", 1: "small", 4: "large", 5: "absent"}
    metrics = evaluate_case(_image(pred), _image(ref), names)
    assert set(metrics) == {"small", "large", "absent"}
    assert metrics["small"]["volume_ratio"] == 2.0
    assert math.isclose(metrics["small"]["dice"], 2 * 8 / (16 + 8), rel_tol=1e-6)
    assert metrics["large"]["dice"] == 1.0 and metrics["large"]["volume_ratio"] == 1.0
    assert metrics["large"]["hd95"] == 0.0
    assert math.isnan(metrics["absent"]["volume_ratio"]) and math.isnan(metrics["absent"]["dice"])
