"""Offline trainer: masked-autoencoder pretraining learns to reconstruct; training resumes where it stopped."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from cli.main import app
from models.network import GlobalLocalUNet
from models.phantom import PHANTOM_LABELS
from models.sampling import block_mask, make_views
from trainer.config import PLANS, Plan, TrainConfig
from trainer.data import labelled_pairs, load_case, load_prepared
from trainer.train import TrainRun, pretrain_mae, train_source, view_batches


def _cases(phantom_dir, cfg, labelled=True):
    return [
        load_case(
            i,
            lab if labelled else None,
            spacing=cfg.target_spacing,
            normalisation=cfg.normalisation,
            n_classes=3,
        )
        for i, lab in labelled_pairs(phantom_dir / "images", phantom_dir / "labels")
    ]


def _masked_error(net, cases, cfg) -> float:
    rng = np.random.default_rng(123)
    v = make_views([c.image for c in cases[:4]], cfg.patch_size, rng)
    mask = block_mask(v.local.shape, cfg.mask_block, cfg.mask_ratio, torch.Generator().manual_seed(1))
    net.eval()
    with torch.no_grad():
        rec, _ = net.reconstruct(v.local * mask, v.global_view * mask, v.box)
    return float(F.mse_loss(rec * (1 - mask), v.local * (1 - mask)))


def test_mae_pretraining_reconstructs_masked_blocks(phantom_dir, tiny_config, tmp_path):
    cfg = tiny_config.model_copy(update={"steps": 40, "lr": 5e-3})
    cases = _cases(phantom_dir, cfg, labelled=False)
    torch.manual_seed(cfg.seed)
    before = _masked_error(GlobalLocalUNet(cfg.network), cases, cfg)
    weights = pretrain_mae(cases, tmp_path, cfg=cfg)
    net = GlobalLocalUNet(cfg.network)
    net.load_state_dict(torch.load(weights, weights_only=True))
    assert _masked_error(net, cases, cfg) < 0.7 * before


def test_training_resumes_from_its_checkpoint(phantom_dir, tiny_config, tmp_path, monkeypatch):
    import trainer.train as train_module

    cases = _cases(phantom_dir, tiny_config)
    cfg = tiny_config.model_copy(update={"steps": 6, "val_every": 2})
    real_validate, calls = train_module.validate, []

    def interrupted_validate(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # stopped at step 4, after the step-2 checkpoint
        return real_validate(*args)

    monkeypatch.setattr(train_module, "validate", interrupted_validate)
    run = TrainRun(tmp_path / "w", tmp_path / "b", "p")
    with pytest.raises(KeyboardInterrupt):
        train_source(cases[:4], cases[6:], PHANTOM_LABELS, run, cfg)
    assert not (tmp_path / "b").exists()
    monkeypatch.setattr(train_module, "validate", real_validate)
    bundle = train_source(cases[:4], cases[6:], PHANTOM_LABELS, run, cfg)
    steps = [h["step"] for h in json.loads((tmp_path / "w" / "history.json").read_text())]
    assert steps == [2, 4, 6]
    assert bundle.card.training["train_cases"] == [c.case for c in cases[:4]]
    curve = bundle.card.training["curve"]  # held-out Dice against training seconds, across the resumption
    assert [p["step"] for p in curve] == steps and curve[0]["seconds"] < curve[-1]["seconds"]
    assert all(0 <= p["dice_mean"] <= 1 for p in curve)


def test_a_bundle_trained_in_stages_records_every_earlier_stage(phantom_dir, tiny_config, tmp_path):
    cases = _cases(phantom_dir, tiny_config)
    first_cfg = tiny_config.model_copy(update={"steps": 4, "val_every": 2})
    first = train_source(
        cases[:4], cases[6:], PHANTOM_LABELS, TrainRun(tmp_path / "w1", tmp_path / "b1", "p"), first_cfg
    )
    assert first.card.training["earlier_stages"] == []
    later_cfg = first_cfg.model_copy(update={"steps": 2, "lr": 1e-3})
    stages = []
    for n in (2, 3):  # each stage starts from the previous stage's bundle
        run = TrainRun(
            tmp_path / f"w{n}",
            tmp_path / f"b{n}",
            "p",
            version=str(n),
            init_weights=tmp_path / f"b{n - 1}" / "weights.pt",
        )
        bundle = train_source(cases[:4], cases[6:], PHANTOM_LABELS, run, later_cfg)
        stages.append(bundle.card.training["earlier_stages"])
    assert [s["bundle"] for s in stages[0]] == ["p:1"]
    assert [s["bundle"] for s in stages[1]] == ["p:1", "p:2"]
    assert [(s["steps"], s["lr"]) for s in stages[1]] == [(4, first_cfg.lr), (2, 1e-3)]
    assert stages[1][0]["seconds"] == first.card.training["seconds"]
    assert stages[1][0]["curve"] == first.card.training["curve"]
    assert stages[1][0]["dice_mean"] == first.card.validation["dice_mean"]


def test_a_broken_card_beside_the_initial_weights_stops_training_before_it_starts(tmp_path):
    (tmp_path / "b").mkdir()
    torch.save({}, tmp_path / "b" / "weights.pt")
    (tmp_path / "b" / "model_card.json").write_text('{"name": "p", "labels": "not a mapping"}')
    (tmp_path / "labels.json").write_text(json.dumps({str(k): v for k, v in PHANTOM_LABELS.items()}))
    result = CliRunner().invoke(
        app,
        ["train", "--images", str(tmp_path), "--label-names", str(tmp_path / "labels.json")]
        + ["--pretrained", str(tmp_path / "b" / "weights.pt")]
        + ["--work", str(tmp_path / "w"), "--out", str(tmp_path / "out")],
    )
    assert result.exit_code == 2 and "invalid model card" in result.output
    assert not (tmp_path / "w").exists() and not (tmp_path / "out").exists()


def test_without_validation_cases_the_bundle_keeps_the_last_weights(phantom_dir, tiny_config, tmp_path):
    cases = _cases(phantom_dir, tiny_config)
    cfg = tiny_config.model_copy(update={"steps": 6, "val_every": 2})
    steps = []
    bundle = train_source(
        cases[:4],
        [],
        PHANTOM_LABELS,
        TrainRun(tmp_path / "w", tmp_path / "b", "p"),
        cfg,
        progress=lambda step, status: steps.append(step),
    )
    assert steps == [0, 1, 2, 3, 4, 5, 6]
    last = torch.load(tmp_path / "w" / "last.pt", weights_only=False)
    assert last["step"] == 6
    shipped = bundle.load_network().state_dict()
    assert all(torch.equal(shipped[k], v.cpu()) for k, v in last["net"].items())
    assert not (tmp_path / "w" / "best.pt").exists()
    assert "dice_mean" not in bundle.card.validation and "no held-out" in bundle.card.validation["split"]
    assert bundle.card.training["weights"] == "last (step 6)"


def test_pretraining_resumes_from_its_checkpoint(phantom_dir, tiny_config, tmp_path):
    cases = _cases(phantom_dir, tiny_config, labelled=False)
    cfg = tiny_config.model_copy(update={"steps": 6, "checkpoint_every": 2})
    seen = []

    def interrupted(step, status):
        seen.append(step)
        if step == 3:
            raise KeyboardInterrupt  # stopped after step 3, with the step-2 checkpoint written

    with pytest.raises(KeyboardInterrupt):
        pretrain_mae(cases, tmp_path, cfg=cfg, progress=interrupted)
    assert torch.load(tmp_path / "mae_last.pt", weights_only=False)["step"] == 2
    assert not (tmp_path / "mae.pt").exists()
    seen.clear()
    weights = pretrain_mae(cases, tmp_path, cfg=cfg, progress=lambda step, status: seen.append(step))
    assert seen == [2, 3, 4, 5, 6]  # continues from the saved step
    last = torch.load(tmp_path / "mae_last.pt", weights_only=False)
    assert last["step"] == 6
    final = torch.load(weights, weights_only=True)
    assert all(torch.equal(final[k], v) for k, v in last["net"].items())


def test_random_convolution_changes_appearance_not_shape():
    from trainer.augment import RandomConvolutionIntensityd

    rng = np.random.default_rng(0)
    image = rng.normal(size=(1, 6, 32, 32)).astype(np.float32)
    image[:, :, 8:24, 8:24] += 3.0
    label = (image > 1.5).astype(np.float32)
    transform = RandomConvolutionIntensityd(["image"], prob=1.0)
    transform.set_random_state(1)
    out = transform({"image": image, "label": label})
    assert out["image"].shape == image.shape and out["label"] is label
    assert abs(float(out["image"].mean())) < 1e-4 and abs(float(out["image"].std()) - 1.0) < 1e-3
    assert not np.allclose(out["image"], image, atol=0.1)
    again = RandomConvolutionIntensityd(["image"], prob=1.0)
    again.set_random_state(1)
    np.testing.assert_array_equal(again({"image": image})["image"], out["image"])
    off = RandomConvolutionIntensityd(["image"], prob=0.0)({"image": image})
    assert off["image"] is image


def test_weak_augmentation_moves_voxels_and_keeps_their_appearance():
    from trainer.augment import augment, training_augmentation, weak_augmentation

    image = np.zeros((4, 32, 32), np.float32) + 10.0
    image[:, 4:12, 6:26] = 20.0  # an off-centre bright box, so flips and rotations move it
    label = (image > 15).astype(np.int64)
    moved = 0
    for seed in range(8):
        out, lab = augment(weak_augmentation(seed), image, label)
        assert out.min() >= 10.0 - 1e-4 and out.max() <= 20.0 + 1e-4  # nothing remapped, nothing standardised
        assert np.mean(lab == (out > 15)) > 0.97  # labels follow the voxels (zoom: borders interpolated)
        moved += not np.array_equal(out, image)
    assert moved >= 4
    recipe, _ = augment(training_augmentation(0, random_convolution_prob=1.0), image, label)
    assert recipe.min() < 9.0  # the recipe's appearance changes would fail the range check above


def test_weak_augmentation_scales_structures_by_the_zoom_it_is_given():
    from trainer.augment import augment, weak_augmentation

    image = np.zeros((2, 64, 64), np.float32)
    image[:, 24:40, 24:40] = 1.0  # a centred square: flips and rotations keep its area
    label = image.astype(np.int64)
    for factor in (0.5, 1.5):
        _, lab = augment(weak_augmentation(0, zoom=(factor, factor), zoom_prob=1.0), image, label)
        assert lab.sum() / label.sum() == pytest.approx(factor**2, rel=0.1)  # in-plane only: slices kept
    _, lab = augment(weak_augmentation(0, zoom=(0.5, 0.5), zoom_prob=0.0), image, label)
    assert lab.sum() == label.sum()


def test_radial_contraction_shrinks_the_centre_structure_and_thickens_its_wall():
    from pydantic import ValidationError

    from trainer.augment import RandRadialContractiond, augment, training_augmentation

    yy, xx = np.indices((64, 64))
    r = np.hypot(yy - 30, xx - 34)
    plane = np.where(r < 10, 3, np.where(r < 16, 2, 0))  # a cavity (3) in a ring of wall (2)
    label = np.stack([plane, plane, np.zeros_like(plane)])  # the last slice holds no cavity
    image = label.astype(np.float32)
    contract = RandRadialContractiond(["image", "label"], 3, prob=1.0, power=(0.7, 0.7))
    out = contract({"image": image[None], "label": label[None].astype(np.float32)})
    lab = np.asarray(out["label"][0]).round().astype(np.int64)
    cavity = (lab[:2] == 3).sum() / (label[:2] == 3).sum()
    # R = 1.3 x 16; the cavity's radius 10 goes to R (10 / R) ** (1 / 0.7): about half its area
    assert cavity == pytest.approx((10 / 20.8) ** (2 / 0.7 - 2), rel=0.1)
    # the wall keeps its area on a smaller circle, so it thickens
    assert (lab[:2] == 2).sum() / (label[:2] == 2).sum() == pytest.approx(1.0, abs=0.1)
    assert (lab[:2] > 0).sum() < (label[:2] > 0).sum()
    np.testing.assert_array_equal(lab[2], label[2])
    moved = np.asarray(out["image"][0])  # the image (interpolated linearly) moves with its labels
    assert (moved > 2.5).sum() == pytest.approx((lab == 3).sum(), rel=0.1)
    # switched off, the recipe's transforms draw what they drew without it
    plain = augment(training_augmentation(3, location_scale_prob=0.5), image, label)[0]
    off = augment(training_augmentation(3, location_scale_prob=0.5, contraction_label=3), image, label)[0]
    np.testing.assert_array_equal(plain, off)
    with pytest.raises(ValidationError, match="contraction_label"):
        TrainConfig(contraction_prob=0.5)


def test_prepared_dataset_keeps_scans_and_labels(phantom_dir, tmp_path):
    out = tmp_path / "phantoms.npz"
    labels_json = tmp_path / "labels.json"
    labels_json.write_text(json.dumps({str(k): v for k, v in PHANTOM_LABELS.items()}))
    result = CliRunner().invoke(
        app,
        ["prepare", "--images", str(phantom_dir / "images"), "--labels", str(phantom_dir / "labels"),
         "--label-names", str(labels_json), "--out", str(out)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    shipped = TrainConfig()  # the grid and normalisation `prepare` uses
    loaded = load_prepared(out, shipped.target_spacing, shipped.normalisation)
    direct = [
        load_case(i, lab, spacing=shipped.target_spacing, normalisation=shipped.normalisation, n_classes=3)
        for i, lab in labelled_pairs(phantom_dir / "images", phantom_dir / "labels")
    ]
    assert [c.case for c in loaded] == [c.case for c in direct]
    for original, restored in zip(direct, loaded, strict=True):
        np.testing.assert_array_equal(original.labels, restored.labels)
        span = float(original.image.max() - original.image.min())
        assert np.abs(original.image - restored.image).max() <= span / 510 + 1e-5
    with pytest.raises(ValueError, match="prepared for spacing"):
        load_prepared(out, (1.0, 1.0, 1.0), shipped.normalisation)


def test_prepare_takes_the_grid_of_the_plan_named(phantom_dir, tmp_path):
    out = tmp_path / "phantoms-3d.npz"
    result = CliRunner().invoke(
        app, ["prepare", "--images", str(phantom_dir / "images"), "--plan", "3d", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    volumetric = PLANS[Plan.VOLUMETRIC]["target_spacing"]
    assert [c.labels for c in load_prepared(out, volumetric, TrainConfig().normalisation)] == [None] * 8
    with pytest.raises(ValueError, match="prepared for spacing"):
        load_prepared(out, TrainConfig().target_spacing, TrainConfig().normalisation)


def test_data_loader_workers_draw_different_augmented_batches(phantom_dir, tiny_config):
    cases = _cases(phantom_dir, tiny_config)
    cfg = tiny_config.model_copy(update={"batch_size": 2, "workers": 2})
    batches = view_batches(cases, cfg, labelled=True)
    first, second = next(batches), next(batches)  # one from each worker
    for v in (first, second):
        assert v.local.shape == (2, 1, *cfg.patch_size) and v.local_labels.shape == v.local.shape
        assert set(torch.unique(v.local_labels).tolist()) <= {0, 1, 2}
    assert not torch.equal(first.local, second.local)


def test_card_records_the_source_volume_range_and_record_volumes_restores_it(
    tiny_bundle, phantom_dir, tiny_config, tmp_path
):
    import shutil

    from models.bundle import load_bundle, write_card

    voxel_ml = float(np.prod(tiny_config.target_spacing)) / 1000.0
    train_cases = [
        c for c in _cases(phantom_dir, tiny_config) if c.case in tiny_bundle.card.training["train_cases"]
    ]
    volumes = {
        name: [float((c.labels == k).sum()) * voxel_ml for c in train_cases]
        for k, name in PHANTOM_LABELS.items()
        if k
    }
    ranges = tiny_bundle.card.label_volumes_ml
    assert set(ranges) == set(volumes)
    for name, (lo, hi) in ranges.items():
        assert lo == pytest.approx(min(volumes[name]), abs=1e-3) and hi == pytest.approx(
            max(volumes[name]), abs=1e-3
        )
        assert 0 < lo < hi

    bundle_dir = tmp_path / "phantom"
    shutil.copytree(tiny_bundle.path, bundle_dir)
    write_card(tiny_bundle.card.model_copy(update={"label_volumes_ml": {}}), bundle_dir)
    args = ["record-volumes", str(bundle_dir), "--images", str(phantom_dir / "images")]
    result = CliRunner().invoke(app, [*args, "--labels", str(phantom_dir / "labels")])
    assert result.exit_code == 0, result.output
    assert load_bundle(bundle_dir).card.label_volumes_ml == ranges
    # data that lacks some of the card's training cases is refused, and the card is left as it was
    pairs = labelled_pairs(phantom_dir / "images", phantom_dir / "labels")[:2]
    partial = tmp_path / "partial.csv"
    partial.write_text("image,label\n" + "".join(f"{i},{lab}\n" for i, lab in pairs))
    result = CliRunner().invoke(app, ["record-volumes", str(bundle_dir), "--images", str(partial)])
    assert result.exit_code == 2 and "training cases" in result.output
    assert load_bundle(bundle_dir).card.label_volumes_ml == ranges


def test_card_records_the_held_out_foreground_entropy_and_record_entropy_restores_it(
    tiny_bundle, phantom_dir, tmp_path
):
    import shutil

    from models.bundle import load_bundle, write_card

    entropy = tiny_bundle.card.validation["foreground_entropy"]
    assert 0.0 < entropy < 1.0
    bundle_dir = tmp_path / "phantom"
    shutil.copytree(tiny_bundle.path, bundle_dir)
    older = {k: v for k, v in tiny_bundle.card.validation.items() if k != "foreground_entropy"}
    write_card(tiny_bundle.card.model_copy(update={"validation": older}), bundle_dir)
    args = ["record-entropy", str(bundle_dir), "--images", str(phantom_dir / "images")]
    result = CliRunner().invoke(app, [*args, "--labels", str(phantom_dir / "labels")])
    assert result.exit_code == 0, result.output
    assert load_bundle(bundle_dir).card.validation == {**older, "foreground_entropy": pytest.approx(entropy)}
    # the held-out cases must all be there
    pairs = labelled_pairs(phantom_dir / "images", phantom_dir / "labels")[:2]
    partial = tmp_path / "partial.csv"
    partial.write_text("image,label\n" + "".join(f"{i},{lab}\n" for i, lab in pairs))
    result = CliRunner().invoke(app, ["record-entropy", str(bundle_dir), "--images", str(partial)])
    assert result.exit_code == 2 and "held-out cases" in result.output
