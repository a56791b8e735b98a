"""``--mode semi`` on phantoms: labelled scans of one scanner plus unlabelled scans of three, without domain labels."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from typer.testing import CliRunner

from cli.main import app
from models.guard import dice_per_class
from models.inference import predict_volume, torch_predictor
from models.mpl import PseudoLabels
from models.phantom import PHANTOM_LABELS, phantom
from models.preprocessing import Normalisation
from models.sampling import Views
from models.terms import TrainMode
from trainer.config import SemiConfig
from trainer.data import TrainingCase, labelled_pairs, load_case
from trainer.mixing import aligned_views, amplitude_mix, cutmix_box, fit_to
from trainer.semi import HardestScan, ReliablePool, train_semi
from trainer.train import TrainRun

# the phantoms' scanner, its noisy scanner, and a noisier one still
DOMAINS = ("none", "noise", "noisier")
FAST = SemiConfig(
    mpl={"ema": 0.9, "mask_block": (2, 8, 8), "student_sees_unmasked": False},
    unlabelled_weight=1.0,
    rampup=0.0,
)


def _scan(seed: int, domain: str, labelled: bool = True) -> TrainingCase:
    image, labels = phantom(seed, shift="none" if domain == "none" else "noise")
    array = sitk.GetArrayFromImage(image).astype(np.float32) / 1000
    if domain == "noisier":
        array = array + np.random.default_rng(seed + 7).normal(0, 0.1, array.shape).astype(np.float32)
    lab = sitk.GetArrayFromImage(labels).astype(np.int64)
    voxel_ml = float(np.prod(image.GetSpacing())) / 1000
    return TrainingCase(f"{domain}{seed}", Normalisation().apply(array), lab if labelled else None, voxel_ml)


def _labelled(phantom_dir, cfg) -> list[TrainingCase]:
    pairs = labelled_pairs(phantom_dir / "images", phantom_dir / "labels")
    grid = {"spacing": cfg.target_spacing, "normalisation": cfg.normalisation, "n_classes": 3}
    return [load_case(i, lab, **grid) for i, lab in pairs]


def _dice(net, cases, patch) -> float:
    predict = torch_predictor(net.eval())
    return float(
        np.mean(
            [
                np.nanmean(dice_per_class(predict_volume(c.image, predict, patch).argmax(0), c.labels, 3))
                for c in cases
            ]
        )
    )


@pytest.mark.slow  # minutes on 2 cores
def test_semi_beats_the_labelled_scans_alone_on_the_unlabelled_domains(
    tiny_bundle, phantom_dir, tiny_config, tmp_path
):
    labelled = _labelled(phantom_dir, tiny_config)[:6]  # the cases the labelled-only bundle was trained on
    pool = [_scan(100 + 10 * k + i, d, labelled=False) for k, d in enumerate(DOMAINS) for i in range(4)]
    held_out = {d: [_scan(500 + 10 * k + i, d) for i in range(3)] for k, d in enumerate(DOMAINS)}
    cfg = tiny_config.model_copy(update={"steps": 30, "batch_size": 2, "lr": 1e-3, "val_every": 30})
    bundle = train_semi(
        labelled,
        pool,
        [],
        PHANTOM_LABELS,
        TrainRun(tmp_path / "w", tmp_path / "b", "semi", init_weights=tiny_bundle.path / "weights.pt"),
        cfg,
        FAST,
    )
    alone, semi = tiny_bundle.load_network(), bundle.load_network()
    before = {d: _dice(alone, cases, cfg.patch_size) for d, cases in held_out.items()}
    after = {d: _dice(semi, cases, cfg.patch_size) for d, cases in held_out.items()}
    shifted = [d for d in DOMAINS if d != "none"]
    print(f"Dice per scanner, labelled only {before}, semi {after}")
    gain = np.mean([after[d] for d in shifted]) - np.mean([before[d] for d in shifted])
    assert gain >= 0.03, (before, after)
    assert after["none"] >= before["none"] - 0.03, (before, after)


def test_semi_resumes_and_its_card_records_mode_data_and_rule(phantom_dir, tiny_config, tmp_path):
    labelled = _labelled(phantom_dir, tiny_config)
    pool = [_scan(200 + i, d, labelled=False) for i, d in enumerate(DOMAINS)]
    cfg = tiny_config.model_copy(update={"steps": 4, "batch_size": 1, "val_every": 2})
    run = (TrainRun(tmp_path / "w", tmp_path / "b", "semi"), cfg, FAST)

    def interrupted(step, status):
        if step == 3:
            raise KeyboardInterrupt  # stopped after step 3, with the step-2 checkpoint written

    with pytest.raises(KeyboardInterrupt):
        train_semi(labelled[:2], pool, labelled[6:7], PHANTOM_LABELS, *run, progress=interrupted)
    assert not (tmp_path / "b").exists()
    seen = []
    bundle = train_semi(
        labelled[:2],
        pool,
        labelled[6:7],
        PHANTOM_LABELS,
        *run,
        progress=lambda step, status: seen.append(step),
    )
    assert seen == [2, 3, 4]  # continues from the saved step
    history = json.loads((tmp_path / "w" / "history.json").read_text())
    assert [h["step"] for h in history] == [2, 4]
    assert history[1]["seconds"] >= history[0]["seconds"] > 0
    last = torch.load(tmp_path / "w" / "last.pt", weights_only=False)
    assert last["step"] == 4 and set(last) >= {"teacher", "pool", "mask_generator"}
    training = bundle.card.training
    assert training["mode"] == TrainMode.SEMI
    assert training["labelled_cases"] == [c.case for c in labelled[:2]]
    assert training["unlabelled_cases"] == [c.case for c in pool]
    assert "UST-RUN" in training["rule"] and "dice_mean" in bundle.card.validation


def test_train_command_gives_semi_the_unlabelled_pool(phantom_dir, tmp_path, monkeypatch):
    import trainer.semi

    labels_json = tmp_path / "labels.json"
    labels_json.write_text(json.dumps({str(k): v for k, v in PHANTOM_LABELS.items()}))
    base = ["train", "--images", str(phantom_dir / "images"), "--labels", str(phantom_dir / "labels"),
            "--label-names", str(labels_json), "--out", str(tmp_path / "b"), "--val-cases", "2"]  # fmt: skip
    result = CliRunner().invoke(app, [*base, "--mode", "semi"])
    assert result.exit_code == 2 and "--unlabelled" in result.output
    calls = []

    def recorded(labelled, unlabelled, val_cases, labels, run, cfg, semi, **kwargs):
        calls.append((labelled, unlabelled, val_cases, run, semi))
        return SimpleNamespace(card=SimpleNamespace(validation={}, training={"weights": "last"}))

    monkeypatch.setattr(trainer.semi, "train_semi", recorded)
    pool = [str(phantom_dir / "images"), "--unlabelled", str(phantom_dir / "images")]
    result = CliRunner().invoke(app, [*base, "--mode", "semi", "--unlabelled", *pool])
    assert result.exit_code == 0, result.output
    [(labelled, unlabelled, val_cases, run, semi)] = calls
    assert len(labelled) == 6 and len(val_cases) == 2 and len(unlabelled) == 16
    assert all(c.labels is None for c in unlabelled) and all(c.labels is not None for c in labelled)
    assert run.summary["unlabelled"] == [str(phantom_dir / "images")] * 2
    assert semi == SemiConfig()

    settings = '{"unlabelled_weight": 0.3, "mpl": {"confidence": 0.9}}'
    result = CliRunner().invoke(
        app, [*base, "--mode", "semi", "--unlabelled", *pool, "--semi-config", settings]
    )
    assert result.exit_code == 0, result.output
    semi = calls[-1][-1]
    assert semi.unlabelled_weight == 0.3 and semi.mpl.confidence == 0.9 and semi.rampup == SemiConfig().rampup
    for args in (["--mode", "semi", "--unlabelled", *pool, "--semi-config", '{"unlabelled_weight": "x"}'],
                 ["--mode", "semi", "--unlabelled", *pool, "--semi-config", "{"],
                 ["--mode", "semi", "--unlabelled", *pool, "--semi-config", '{"unlabelled_batch_size": 0}'],
                 ["--mode", "semi", "--unlabelled", *pool, "--semi-config", '{"rampup": 2}'],
                 ["--semi-config", "{}"]):  # fmt: skip
        result = CliRunner().invoke(app, [*base, *args])
        assert result.exit_code == 2 and "--semi-config" in result.output, result.output
    assert len(calls) == 2


def test_intermediate_scans_keep_grid_anatomy_and_alignment():
    rng = np.random.default_rng(0)
    image = rng.normal(size=(6, 20, 24)).astype(np.float32)
    assert fit_to(image, (6, 30, 10), 0.0).shape == (6, 30, 10)
    np.testing.assert_array_equal(fit_to(image, (6, 30, 24), 0.0)[:, 5:25], image)
    box = cutmix_box(image.shape, rng, (0.1, 0.3), (0.5, 2.0))
    assert box[0].sum() == box[-1].sum() and 0.05 * 20 * 24 <= box[0].sum() <= 0.35 * 20 * 24
    style = 3.0 * rng.normal(size=image.shape).astype(np.float32) + 2.0
    np.testing.assert_allclose(amplitude_mix(image, style, 0.0, 0.1), image, atol=1e-4)
    mixed = amplitude_mix(image, style, 1.0, 0.1)
    assert abs(mixed.mean() - style.mean()) < abs(image.mean() - style.mean())  # the zero frequency moved
    labels = (image > 0).astype(np.int64)
    views = aligned_views([[image, labels]], (4, 8, 8), rng, maps=[False, True])
    assert torch.equal((views[0].local > 0).long(), views[1].local.long())  # the same patch of both
    assert set(views[1].global_view.unique().tolist()) <= {0.0, 1.0}  # maps are sampled nearest


def test_reliable_pool_keeps_the_newest_easy_scans():
    pool = ReliablePool(SemiConfig(reliable_pool=2, reliable_hardness=0.1))
    pool.update([0, 1, 2], [0.0, 0.5, 0.0])  # the first step: the student is its teacher
    assert pool.members == [0, 2]
    pool.update([3], [0.09])  # the threshold stays: a later scan is admitted, the oldest leaves
    assert pool.members == [3, 0]
    pool.update([0, 4], [0.02, 0.3])  # a scan admitted again moves up, once
    assert pool.members == [0, 3]
    assert ReliablePool(SemiConfig(), pool.state()).members == pool.members


def test_the_hardest_scan_is_learnt_next_step_around_a_labelled_box():
    shape = (2, 4, 16, 16)  # two scans of (z, y, x)
    plain = Views(torch.zeros(2, 1, *shape[1:]), torch.zeros(2, 1, *shape[1:]), torch.zeros(2, 6))
    own = torch.zeros(shape, dtype=torch.long)
    own[1, :, 2:4, 2:4] = 1  # the kept scan's structure, top left
    weight = torch.full(shape, 0.5)
    teacher = PseudoLabels(own, own.clone(), weight, weight.clone(), torch.zeros(2, 3, *shape[1:]))
    hardest = HardestScan()
    rng = np.random.default_rng(0)
    assert hardest.mixed(plain, rng, FAST) is None  # nothing kept before the first step
    hardest.remember(plain, teacher, [0.1, 0.7])  # the second scan is the least reliable
    ref = torch.zeros((1, 1, *shape[1:]), dtype=torch.long)
    ref[0, 0, :, 10:12, 9:13] = 2  # the labelled view's structure, bottom right
    lab = Views(
        torch.ones(1, 1, *shape[1:]), torch.ones(1, 1, *shape[1:]), torch.zeros(1, 6), ref, ref.clone()
    )
    views, labels = hardest.mixed(lab, rng, FAST)
    inside = torch.zeros(shape[1:], dtype=torch.bool)
    inside[:, 2:12, 2:13] = True  # the box covering both structures, through all slices
    both = [(views.local, labels.local, labels.local_weight)]
    both.append((views.global_view, labels.global_, labels.global_weight))
    for image, got, w in both:
        assert torch.equal(image[0, 0] > 0, inside)  # the labelled view inside, the kept scan outside
        assert torch.equal(got[0], torch.where(inside, ref[0, 0], own[1]))
        assert torch.equal(w[0], torch.where(inside, 1.0, 0.5))
    restored = HardestScan(hardest.state())
    assert torch.equal(restored.labels.local, own[1:])
