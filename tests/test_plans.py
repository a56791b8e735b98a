"""Network plans: a slice-wise (2D) plan trains, segments, exports and sees each slice's own global view."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cli.main import app
from models.adaptation import adapt, structure_shares
from models.bundle import load_bundle
from models.inference import predict_volume, torch_predictor
from models.network_config import NetworkConfig
from models.phantom import PHANTOM_LABELS
from models.sampling import make_views
from trainer.augment import RandLocationScaled
from trainer.config import PLANS, Plan, TrainConfig
from trainer.data import labelled_pairs, load_case
from trainer.train import TrainRun, train_source

PLAN_2D = NetworkConfig(
    out_channels=3,
    channels=(8, 16, 32),
    kernels=((1, 3, 3),) * 3,
    strides=((1, 1, 1), (1, 2, 2), (1, 2, 2)),
    spatial_dims=2,
)


def test_a_2d_plan_refuses_kernels_across_slices():
    with pytest.raises(ValueError, match="depth 1"):
        NetworkConfig(spatial_dims=2)


def test_slice_wise_views_see_the_whole_slice_of_their_patch():
    vol = np.stack([np.full((20, 24), float(z)) for z in range(6)])  # slice z holds the value z
    labels = np.stack([np.full((20, 24), z % 3) for z in range(6)])
    v = make_views([vol] * 4, (1, 16, 16), np.random.default_rng(0), labels=[labels] * 4)
    for local, gview, glab in zip(v.local, v.global_view, v.global_labels, strict=True):
        z = local[0, 0, 0, 0].item()
        assert torch.all(gview == z) and torch.all(glab == int(z) % 3)


def test_a_2d_plan_learns_the_phantoms_and_its_onnx_export_matches(phantom_dir, tiny_config, tmp_path):
    cfg = tiny_config.model_copy(
        update={"network": PLAN_2D, "patch_size": (1, 32, 32), "batch_size": 8, "steps": 120, "val_every": 60}
    )
    cases = [
        load_case(i, lab, spacing=cfg.target_spacing, normalisation=cfg.normalisation, n_classes=3)
        for i, lab in labelled_pairs(phantom_dir / "images", phantom_dir / "labels")
    ]
    bundle = train_source(
        cases[:6],
        cases[6:],
        PHANTOM_LABELS,
        TrainRun(tmp_path / "w", tmp_path / "b", "p"),
        cfg,
    )
    assert bundle.card.network.spatial_dims == 2
    assert bundle.card.validation["dice_mean"] > 0.6
    loaded = load_bundle(tmp_path / "b")
    net = loaded.load_network().eval()
    probs = predict_volume(cases[6].image, torch_predictor(net), loaded.card.patch_size)
    assert probs.shape == (3, *cases[6].image.shape)
    volumes = [c.image for c in cases[6:]]
    shares = structure_shares(net, volumes, loaded.card.patch_size)
    assert shares.shape == (2, 2) and np.all(shares > 0.01)  # both structures, over every slice of both scans
    adapted = adapt(loaded.load_network(), volumes, loaded.card.patch_size, method="mpl", steps=2)
    assert adapted.steps_run == 2
    gen = torch.Generator().manual_seed(0)
    local, gview = torch.randn(3, 1, 1, 32, 32, generator=gen), torch.randn(3, 1, 1, 32, 32, generator=gen)
    box = torch.tensor([[0.0, 0.1, 0.2, 1.0, 0.6, 0.7]]).expand(3, 6)
    import onnxruntime as ort

    session = ort.InferenceSession(str(loaded.onnx_path), providers=["CPUExecutionProvider"])
    expected = net(local, gview, box).local_logits.detach().numpy()
    got = session.run(["logits"], {"local": local.numpy(), "global_view": gview.numpy(), "box": box.numpy()})[
        0
    ]
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_location_scale_remaps_each_structure_on_its_own():
    rng = np.random.default_rng(0)
    labels = np.zeros((1, 4, 32, 32), dtype=np.float32)
    labels[:, :, 8:24, 8:24] = 1
    image = (labels + 0.01 * rng.standard_normal(labels.shape)).astype(np.float32)
    t = RandLocationScaled(["image"], prob=1.0, local_prob=1.0, n_classes=2)
    spreads = []
    for seed in range(8):
        t.set_random_state(seed)
        out = t({"image": image, "label": labels})["image"]
        assert out.shape == image.shape and abs(float(out.mean())) < 1e-3
        inside, outside = out[0, :, 12:20, 12:20].mean(), out[0, :, :4, :4].mean()
        spreads.append(inside - outside)
    # structures keep apart (no structure is washed out) but their order and contrast change from draw to draw
    assert min(abs(s) for s in spreads) > 0.1 and min(spreads) < 0 < max(spreads)


def test_train_config_overrides_are_checked(phantom_dir, tmp_path):
    result = CliRunner().invoke(
        app,
        ["train", "--images", str(phantom_dir / "images"), "--labels", str(phantom_dir / "labels")]
        + ["--config", '{"patch_size": [1, 2]}', "--out", str(tmp_path / "b")],
    )
    assert result.exit_code == 2 and "--config" in result.output
    assert not (tmp_path / "b").exists()


def test_train_defaults_to_the_slice_wise_plan_and_takes_the_3d_plan_by_name(phantom_dir, tmp_path):
    names = tmp_path / "labels.json"
    names.write_text(json.dumps({str(k): v for k, v in PHANTOM_LABELS.items()}))
    cards = {}
    for plan in ([], ["--plan", "3d"]):
        out = tmp_path / f"b{len(plan)}"
        result = CliRunner().invoke(
            app,
            ["train", "--images", str(phantom_dir / "images"), "--labels", str(phantom_dir / "labels")]
            + ["--label-names", str(names), *plan, "--batch-size", "2", "--steps", "2", "--val-cases", "0"]
            + ["--out", str(out), "--work", str(tmp_path / f"w{len(plan)}")],
        )
        assert result.exit_code == 0, result.output
        cards[plan[-1] if plan else "default"] = load_bundle(out).card
    default, volumetric = cards["default"], cards["3d"]
    assert default.network.spatial_dims == 2 and default.network.channels == TrainConfig().network.channels
    assert default.patch_size == (1, 128, 128) and default.target_spacing == (1.8, 1.8, 0.0)
    assert default.training["config"]["location_scale_prob"] == 0.5
    assert default.training["config"]["batch_size"] == 2  # the option overrides the plan's 16
    assert volumetric.network.spatial_dims == 3 and volumetric.patch_size == (16, 112, 112)
    assert volumetric.target_spacing == PLANS[Plan.VOLUMETRIC]["target_spacing"] == (1.8, 1.8, 8.0)


def test_test_time_adaptation_of_a_slice_wise_plan_sees_a_batch_of_slices_from_every_scan():
    from models.adaptation import AdaptConfig, _random_views

    volumes = [np.full((6, 40, 40), float(i), dtype=np.float32) for i in range(3)]  # scan i holds the value i
    cfg = AdaptConfig(slice_batch_size=8)
    views = _random_views(volumes, (1, 32, 32), cfg, np.random.default_rng(0))
    scans = np.bincount([int(v[0, 0, 0, 0].item()) for v in views.local], minlength=3)
    assert views.local.shape == (8, 1, 1, 32, 32) and sorted(scans) == [2, 3, 3]
    volumetric = _random_views(volumes, (4, 32, 32), cfg, np.random.default_rng(0))
    assert volumetric.local.shape[0] == cfg.batch_size
