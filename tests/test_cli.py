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
    assert 0.5 < summary["mean"]["core"]["volume_ratio"] < 2.0
    assert "volume / reference" in result.output


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
    monkeypatch.delenv("TTASEG_BUNDLES")
    result = runner.invoke(app, ["models", "--bundles", str(tmp_path)])
    assert result.exit_code == 0 and "phantom:1" in result.output
    with open(tmp_path / "phantom" / "model.onnx", "r+b") as fh:
        fh.write(b"\x00\x01")
    result = runner.invoke(app, ["models", "--bundles", str(tmp_path)])
    assert result.exit_code == 2 and "checksum" in result.output
    out = str(tmp_path / "o")
    result = runner.invoke(
        app, ["segment", "x.nii.gz", "--model", "phantom", "--bundles", str(tmp_path), "--out", out]
    )
    assert result.exit_code == 2 and "model.onnx: checksum" in result.output


def test_segment_logs_progress_lines_when_not_in_a_terminal(tiny_bundle, phantom_dir, tmp_path):
    images = sorted((phantom_dir / "images").iterdir())[6:]
    args = [
        "segment",
        *map(str, images),
        "--model",
        str(tiny_bundle.path),
        "--adapt",
        "tent",
        "--steps",
        "10",
    ]
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    for line in ("adapting 0%", "adapting 10%", "adapting 50%", "segmenting 50%", "segmenting 100%"):
        assert any(ln.startswith(line) for ln in lines), (line, result.output)
    assert sum(ln.startswith("adapting") for ln in lines) == 11  # 0%, every 10%, done


def test_progress_report_lines_show_steps_and_time_left():
    import io

    from rich.console import Console

    from cli.progress import ProgressReport

    out = io.StringIO()
    with ProgressReport(Console(file=out), {"training": 1000}, unit="steps") as report:
        for step in range(0, 1001, 50):
            report.update("training", step, f"loss {1 / (step + 1):.3f}")
    lines = out.getvalue().splitlines()
    assert len(lines) == 11 and lines[0] == "training 0% (0/1000 steps, loss 1.000)"
    assert lines[1].startswith("training 10% (100/1000 steps, ") and "left, loss 0.010)" in lines[1]
    assert lines[-1].startswith("training 100% (1000/1000 steps, ") and "left" not in lines[-1]


def test_flips_sets_the_source_ensemble_as_a_new_card_version(tiny_bundle, tmp_path):
    from models.bundle import load_bundle

    folder = shutil.copytree(tiny_bundle.path, tmp_path / "bundle")
    result = runner.invoke(app, ["flips", str(folder), "1", "2", "--version", "2"])
    assert result.exit_code == 0, result.output
    card = load_bundle(folder).card  # weights and ONNX untouched: the checksums still hold
    assert card.test_time_flips == (1, 2) and card.version == "2"
    assert card.weights_sha256 == tiny_bundle.card.weights_sha256
    bad = runner.invoke(app, ["flips", str(folder), "3"])
    assert bad.exit_code == 2 and "test_time_flips" in bad.output
    assert load_bundle(folder).card.test_time_flips == (1, 2)  # a refused change leaves the card as it was
    assert runner.invoke(app, ["flips", str(folder)]).exit_code == 0
    assert load_bundle(folder).card.test_time_flips == ()
