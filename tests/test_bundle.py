"""Checkpoint bundles: save, load, verify, resolve by name, and ONNX Runtime parity with PyTorch."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from models.bundle import (
    REPO_BUNDLES,
    BundleError,
    ModelCard,
    bundles_root,
    list_bundles,
    load_bundle,
    resolve_bundle,
)
from models.inference import flip_ensemble, onnx_session, predict_volume, torch_predictor


def test_card_describes_the_model(tiny_bundle):
    card = tiny_bundle.card
    assert card.labels[1] == "core" and card.parameters > 0 and card.flops_per_patch > 0
    assert card.onnx_opset >= 17 and len(card.weights_sha256) == 64
    assert card.validation["dice_mean"] > 0.5
    assert card.training["train_cases"] and card.created_at


def test_onnx_matches_pytorch(tiny_bundle):
    net = tiny_bundle.load_network()
    session = onnx_session(tiny_bundle.onnx_path)
    gen = torch.Generator().manual_seed(0)
    local = torch.randn(2, 1, *tiny_bundle.card.patch_size, generator=gen)
    gview = torch.randn(2, 1, *tiny_bundle.card.patch_size, generator=gen)
    box = torch.tensor([[0.0, 0.1, 0.2, 1.0, 0.6, 0.9], [0.2, 0.0, 0.0, 0.9, 1.0, 0.5]])
    with torch.no_grad():
        expected = net(local, gview, box).local_logits.numpy()
    got = session.run(["logits"], {"local": local.numpy(), "global_view": gview.numpy(), "box": box.numpy()})[
        0
    ]
    assert np.abs(got - expected).max() < 1e-4


def test_flip_ensemble_mirrors_back_what_it_mirrors(tiny_bundle):
    predict, patch = torch_predictor(tiny_bundle.load_network().eval()), tiny_bundle.card.patch_size
    half = np.random.default_rng(0).normal(size=(patch[0], patch[1], patch[2] // 2)).astype(np.float32)
    scan = np.concatenate([half, half[:, :, ::-1]], axis=2)  # mirror-symmetric along x, one window
    plain = predict_volume(scan, predict, patch)
    assert np.abs(plain - plain[..., ::-1]).max() > 1e-3  # a network alone is not mirror-symmetric
    both = predict_volume(scan, flip_ensemble(predict, [2]), patch)
    assert np.abs(both - both[..., ::-1]).max() < 1e-5  # the ensemble is: its mirror views were mirrored back
    assert flip_ensemble(predict, []) is predict
    card = tiny_bundle.card.model_dump()
    for wrong in ([1, 2, 1], [0], [3]):  # in-plane axes only, at most two of them
        with pytest.raises(ValidationError, match="test_time_flips"):
            ModelCard.model_validate({**card, "test_time_flips": wrong})


def test_a_card_keeps_own_slices_with_a_zero_spacing_and_refuses_a_negative_one(tiny_bundle, tmp_path):
    card = tiny_bundle.card.model_dump()
    assert ModelCard.model_validate({**card, "target_spacing": [1.5, 1.5, 0]}).target_spacing == (
        1.5,
        1.5,
        0.0,
    )
    with pytest.raises(ValidationError, match="target_spacing"):
        ModelCard.model_validate({**card, "target_spacing": [1.5, -1.5, 3.0]})
    copy = tmp_path / "b"
    shutil.copytree(tiny_bundle.path, copy)
    (copy / "model_card.json").write_text(json.dumps({**card, "target_spacing": [1.5, 1.5, -3.0]}))
    with pytest.raises(BundleError, match="invalid model card"):
        load_bundle(copy)


def test_a_card_refuses_a_shift_gate_reference_that_is_not_an_entropy(tiny_bundle, tmp_path):
    card = tiny_bundle.card.model_dump()
    for wrong in (0.0, -0.1, 1.5, "0.1", True, float("nan")):
        with pytest.raises(ValidationError, match="foreground_entropy"):
            ModelCard.model_validate(
                {**card, "validation": {**card["validation"], "foreground_entropy": wrong}}
            )
    copy = tmp_path / "b"
    shutil.copytree(tiny_bundle.path, copy)
    card["validation"]["foreground_entropy"] = -1.0
    (copy / "model_card.json").write_text(json.dumps(card))
    with pytest.raises(BundleError, match="invalid model card"):
        load_bundle(copy)


def test_corrupted_weights_are_refused(tiny_bundle, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(tiny_bundle.path, copy)
    _corrupt(copy)
    with pytest.raises(BundleError, match="checksum"):
        load_bundle(copy)


def test_invalid_card_and_missing_files(tiny_bundle, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(tiny_bundle.path, copy)
    card = json.loads((copy / "model_card.json").read_text())
    del card["labels"]
    (copy / "model_card.json").write_text(json.dumps(card))
    with pytest.raises(BundleError, match="invalid model card"):
        load_bundle(copy)
    (copy / "model_card.json").unlink()
    with pytest.raises(BundleError, match="not a bundle"):
        load_bundle(copy)


def test_resolve_by_name_and_version(tiny_bundle, tmp_path):
    root = tmp_path / "registry"
    shutil.copytree(tiny_bundle.path, root / "phantom")
    assert resolve_bundle("phantom", root).card.name == "phantom"
    assert resolve_bundle("phantom:1", root).path == root / "phantom"
    with pytest.raises(BundleError, match="unknown model 'nope'"):
        resolve_bundle("nope", root)
    with pytest.raises(BundleError, match="unknown model"):
        resolve_bundle("phantom:9", root)


def _corrupt(folder) -> None:
    with open(folder / "weights.pt", "r+b") as fh:
        fh.seek(200)
        fh.write(b"\x00\x01\x02\x03")


def test_a_corrupt_bundle_in_the_registry_reports_its_checksum(tiny_bundle, tmp_path):
    root = tmp_path / "registry"
    shutil.copytree(tiny_bundle.path, root / "phantom")
    shutil.copytree(tiny_bundle.path, root / "other")
    card = json.loads((root / "other" / "model_card.json").read_text())
    (root / "other" / "model_card.json").write_text(json.dumps({**card, "name": "other"}))
    _corrupt(root / "phantom")
    with pytest.raises(BundleError, match="phantom/weights.pt: checksum"):
        resolve_bundle("phantom", root)
    with pytest.raises(BundleError, match="1 broken bundle.*phantom/weights.pt: checksum"):
        list_bundles(root)
    assert resolve_bundle("other", root).card.name == "other"  # the others still resolve


def test_bundles_root_is_the_callers_not_the_environments(tmp_path, monkeypatch):
    monkeypatch.setenv("TTASEG_BUNDLES", str(tmp_path))
    assert bundles_root() == REPO_BUNDLES
    assert bundles_root(tmp_path) == tmp_path


def test_bundle_module_imports_without_torch():
    code = "import sys, models.bundle; assert 'torch' not in sys.modules, 'torch imported'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
