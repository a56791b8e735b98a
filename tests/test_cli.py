"""The ``ttaseg`` command line: segment a batch, evaluate, list models; clear errors for bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import SimpleITK as sitk
from typer.testing import CliRunner

from cli.main import app
from models.io import same_grid

runner = CliRunner()


def test_segment_then_evaluate(tiny_bundle, phantom_dir, tmp_path):
    images = sorted((phantom_dir / "images").iterdir())[6:]
    out = tmp_path / "out"
    result = runner.invoke(
        app,
        [
            "segment",
            *map(str, images),
            "--model",
            str(tiny_bundle.path),
            "--adapt",
            "none",
            "--out",
            str(out),
            "--uncertainty",
        ],
    )
    assert result.exit_code == 0, result.output
    for img in images:
        pred = sitk.ReadImage(str(out / img.name))
        assert same_grid(pred, sitk.ReadImage(str(img)))
        assert (out / img.name.replace(".nii.gz", "_uncertainty.nii.gz")).exists()
    names = tmp_path / "labels.json"
    names.write_text(json.dumps({"0": "background", "1": "core", "2": "shell"}))
    metrics = tmp_path / "m.json"
    result = runner.invoke(
        app,
        [
            "evaluate",
            "--pred",
            str(out),
            "--labels",
            str(phantom_dir / "labels"),
            "--label-names",
            str(names),
            "--json",
            str(metrics),
        ],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(metrics.read_text())
    assert set(summary["cases"]) == {"case06", "case07"}
    assert summary["mean"]["mean"]["dice"] > 0.5
    assert np.isfinite(summary["mean"]["core"]["hd95"])


def test_bad_input_and_unknown_model_exit_with_reason(tiny_bundle, tmp_path):
    flat = tmp_path / "flat.nii.gz"
    sitk.WriteImage(sitk.Image(16, 16, 4, sitk.sitkInt16), str(flat))
    result = runner.invoke(
        app,
        [
            "segment",
            str(flat),
            "--model",
            str(tiny_bundle.path),
            "--adapt",
            "none",
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert result.exit_code == 2 and "constant" in result.output
    result = runner.invoke(
        app, ["segment", str(flat), "--model", "no-such-model", "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 2 and "unknown model" in result.output


def test_models_lists_a_registry(tiny_bundle, tmp_path, monkeypatch):
    shutil.copytree(tiny_bundle.path, tmp_path / "phantom")
    monkeypatch.setenv("TTASEG_BUNDLES", str(tmp_path))
    result = runner.invoke(app, ["models"])
    assert result.exit_code == 0 and "phantom:1" in result.output
