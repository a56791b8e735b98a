"""What the pipeline writes for judging adaptation: the source model's label map and the uncertainty map."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

import models.pipeline as pipeline
from models.adaptation import AdaptConfig
from models.bundle import Bundle
from models.phantom import save_untrained_bundle, write_phantoms

TINY = AdaptConfig(steps=2, batch_size=1, min_steps=1)


@pytest.fixture(scope="module")
def untrained(tmp_path_factory) -> Bundle:
    """An untrained phantom bundle: the files, not the segmentation quality, are under test."""
    return save_untrained_bundle(tmp_path_factory.mktemp("bundle") / "phantom")


def _array(path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def test_adapting_writes_the_source_label_map_and_uncertainty(untrained, tmp_path, monkeypatch):
    (image, _), *_ = write_phantoms(tmp_path / "scans", 1, seed=7, shift="noise")
    calls = []
    predict = pipeline.predict_volume
    monkeypatch.setattr(pipeline, "predict_volume", lambda *a: calls.append(1) or predict(*a))
    (result,) = pipeline.segment_batch(
        [image], untrained, tmp_path / "tent", method="tent", steps=2, adapt_config=TINY, uncertainty=True
    )
    assert len(calls) == 2  # the source prediction the guard compares with is the one written

    record = json.loads(result.json_path.read_text())
    assert record["source_label_file"] == f"{result.case}_source.nii.gz"
    assert record["uncertainty_file"] == f"{result.case}_uncertainty.nii.gz"
    grid = sitk.ReadImage(str(image))
    for name in (record["source_label_file"], record["uncertainty_file"]):
        written = sitk.ReadImage(str(tmp_path / "tent" / name))
        assert written.GetSize() == grid.GetSize() and written.GetSpacing() == pytest.approx(
            grid.GetSpacing()
        )
    uncertainty = _array(tmp_path / "tent" / record["uncertainty_file"])
    assert uncertainty.dtype == np.float32 and uncertainty.min() >= 0.0 and uncertainty.max() <= 1.0

    (unadapted,) = pipeline.segment_batch([image], untrained, tmp_path / "none", method="none")
    assert np.array_equal(
        _array(tmp_path / "tent" / record["source_label_file"]), _array(unadapted.label_path)
    )
    record = json.loads(unadapted.json_path.read_text())
    assert record["source_label_file"] is None and record["uncertainty_file"] is None
    assert sorted(p.name for p in (tmp_path / "none").iterdir()) == [
        f"{result.case}.json",
        f"{result.case}.nii.gz",
    ]
