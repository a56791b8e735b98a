"""Training modes on phantoms: ``uda`` (source + target together) and ``federated`` (sites in their own processes).

The target domain is a noisier scanner. Each mode is compared with the same run whose target scans never count
(pseudo-label weight 0, or target sites that never join), so a mode that does not use its target scans fails.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cli.main import app
from models.mpl_config import MplConfig
from models.phantom import PHANTOM_LABELS, write_phantoms
from models.terms import TrainMode
from trainer.config import FederatedConfig, UdaConfig
from trainer.data import TrainingCase, labelled_pairs, load_case
from trainer.federated import Site, train_federated
from trainer.train import TrainRun, train_source, validate
from trainer.uda import PRETRAINING, TRAINING, train_uda

MPL = MplConfig(ema=0.9, mask_block=(2, 8, 8))


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory):
    """Target-domain phantoms from a noisier scanner; their labels only score."""
    folder = tmp_path_factory.mktemp("target")
    write_phantoms(folder, 4, seed=100, shift="noise")
    return folder


@pytest.fixture(scope="module")
def cfg(tiny_config):
    return tiny_config.model_copy(update={"batch_size": 2, "lr": 3e-3, "augment": False, "val_every": 1000})


def _cases(folder, cfg, labelled=True):
    return [
        load_case(i, lab if labelled else None, spacing=cfg.target_spacing, normalisation=cfg.normalisation)
        for i, lab in labelled_pairs(folder / "images", folder / "labels")
    ]


@pytest.fixture(scope="module")
def source_weights(phantom_dir, cfg, tmp_path_factory):
    """A source model that the noisier scanner fools a little (no augmentation)."""
    out = tmp_path_factory.mktemp("source")
    run = cfg.model_copy(update={"steps": 60, "batch_size": 4, "lr": 1e-2})
    bundle = train_source(
        _cases(phantom_dir, cfg),
        [],
        PHANTOM_LABELS,
        TrainRun(out / "w", out / "b", "s"),
        run,
    )
    return bundle.path / "weights.pt"


def _target_dice(bundle, target_dir, cfg) -> float:
    return validate(bundle.load_network(), _cases(target_dir, cfg), cfg.patch_size, 3)["dice_mean"]


class SealedCase(TrainingCase):
    """A target case whose labels fail the test when anything reads them."""

    @property
    def labels(self):
        raise AssertionError("a target label was read")

    @labels.setter
    def labels(self, value) -> None:
        pass


def test_uda_pretrains_resumes_and_never_reads_target_labels(phantom_dir, target_dir, cfg, tmp_path):
    source = _cases(phantom_dir, cfg)
    target = [SealedCase(c.case, c.image, None, c.voxel_ml) for c in _cases(target_dir, cfg, labelled=False)]
    run = (
        TrainRun(tmp_path / "w", tmp_path / "b", "u"),
        cfg.model_copy(update={"steps": 4, "val_every": 2, "checkpoint_every": 1}),
        UdaConfig(pretrain_steps=2, warmup_steps=1, target_batch_size=1, mpl=MPL),
    )
    seen = []

    def interrupted(phase, step, status):
        seen.append((phase, step))
        if (phase, step) == (TRAINING, 3):
            raise KeyboardInterrupt  # after the step-2 checkpoint

    with pytest.raises(KeyboardInterrupt):
        train_uda(source[:4], target, source[6:], PHANTOM_LABELS, *run, progress=interrupted)
    assert (PRETRAINING, 2) in seen and (tmp_path / "w" / "mae" / "mae.pt").exists()
    assert not (tmp_path / "b").exists()
    seen.clear()
    bundle = train_uda(
        source[:4], target, source[6:], PHANTOM_LABELS, *run, progress=lambda *a: seen.append(a[:2])
    )
    assert seen[seen.index((TRAINING, 2)) :] == [(TRAINING, s) for s in (2, 3, 4)]  # continues from step 2
    history = json.loads((tmp_path / "w" / "history.json").read_text())
    assert (
        [h["step"] for h in history] == [2, 4] and history[-1]["seconds"] > 0 and "dice_mean" in history[-1]
    )
    training = bundle.card.training
    assert training["mode"] == TrainMode.UDA and "never read" in training["rule"]
    assert training["train_cases"] == [c.case for c in source[:4]]
    assert training["target_cases"] == [c.case for c in target]
    teacher = torch.load(tmp_path / "w" / "last.pt", weights_only=False)["teacher"]
    assert all(torch.equal(bundle.load_network().state_dict()[k], v) for k, v in teacher.items())


@pytest.mark.slow
@pytest.mark.timeout(3600)  # source model + two trainings: minutes on a shared 2-core machine
def test_uda_beats_source_only_on_a_noisier_scanner(phantom_dir, target_dir, cfg, source_weights, tmp_path):
    source, target = _cases(phantom_dir, cfg), _cases(target_dir, cfg, labelled=False)
    dice = {}
    for weight in (0.0, 1.0):  # 0: the same supervised steps with the target's pseudo-labels off
        uda = UdaConfig(pretrain_steps=0, warmup_steps=0, mpl_weight=weight, target_batch_size=2, mpl=MPL)
        run = TrainRun(tmp_path / f"w{weight}", tmp_path / f"b{weight}", "u", init_weights=source_weights)
        bundle = train_uda(
            source, target, [], PHANTOM_LABELS, run, cfg.model_copy(update={"steps": 30, "lr": 1e-3}), uda
        )
        dice[weight] = _target_dice(bundle, target_dir, cfg)
    assert dice[1.0] > dice[0.0] + 0.01, dice


def _sites(phantom_dir, target_dir):
    return [
        Site(
            name="src", images=str(phantom_dir / "images"), labels=str(phantom_dir / "labels"), labelled=True
        ),
        Site(name="tgt", images=str(target_dir / "images")),
    ]


def test_federated_sites_train_in_their_own_processes(phantom_dir, target_dir, cfg, tmp_path):
    fed = FederatedConfig(
        mae_rounds=1, rounds=1, warmup_rounds=0, local_steps=1, target_batch_size=1, mpl=MPL
    )
    bundle = train_federated(
        _sites(phantom_dir, target_dir),
        PHANTOM_LABELS,
        TrainRun(tmp_path / "w", tmp_path / "b", "f"),
        cfg,
        fed,
    )
    history = json.loads((tmp_path / "w" / "history.json").read_text())
    assert [(h["round"], h["phase"]) for h in history] == [(1, "mae"), (2, "segmentation")]
    weights = sum(v.numel() * v.element_size() for v in bundle.load_network().state_dict().values())
    for h in history:  # the global weights go down to both sites and come back up from both
        assert 2 * weights <= h["bytes_down"] < 2.1 * weights and h["bytes_up"] == h["bytes_down"]
        pids = {s["pid"] for s in h["sites"].values()}
        assert len(pids) == 2 and os.getpid() not in pids
    assert history[1]["sites"]["tgt"]["loss"] > 0  # the target site ran masked pseudo-labelling
    training = bundle.card.training
    assert training["mode"] == TrainMode.FEDERATED and "never left" in training["rule"]
    sites = [(s["name"], s["scans"], s["labelled"]) for s in training["sites"]]
    assert sites == [("src", 8, True), ("tgt", 4, False)]
    assert training["bytes_per_round"]["mean"] == np.mean([h["bytes_down"] + h["bytes_up"] for h in history])
    assert set(bundle.card.label_volumes_ml) == {"core", "shell"}


@pytest.mark.slow
@pytest.mark.timeout(3600)  # two federated runs, each starting three processes
def test_federated_resumes_after_the_last_finished_round(phantom_dir, target_dir, cfg, tmp_path):
    rounds = []
    run = TrainRun(tmp_path / "w", tmp_path / "b", "f")
    first = FederatedConfig(
        mae_rounds=1, rounds=0, warmup_rounds=0, local_steps=1, target_batch_size=1, mpl=MPL
    )
    train_federated(_sites(phantom_dir, target_dir), PHANTOM_LABELS, run, cfg, first)
    saved = json.loads((tmp_path / "w" / "history.json").read_text())
    then = first.model_copy(update={"rounds": 1})
    train_federated(
        _sites(phantom_dir, target_dir),
        PHANTOM_LABELS,
        run,
        cfg,
        then,
        progress=lambda r, s: rounds.append(r),
    )
    assert rounds == [1, 2, 2]  # resumed after round 1, ran round 2
    history = json.loads((tmp_path / "w" / "history.json").read_text())
    assert history[0] == saved[0] and [h["round"] for h in history] == [1, 2]


@pytest.mark.slow
@pytest.mark.timeout(3600)  # source model + two trainings: minutes on a shared 2-core machine
def test_federated_beats_source_only_on_a_noisier_scanner(
    phantom_dir, target_dir, cfg, source_weights, tmp_path
):
    dice = {}
    for warmup in (3, 1):  # 3: the target site never joins the three rounds
        fed = FederatedConfig(
            mae_rounds=0, rounds=3, warmup_rounds=warmup, local_steps=10, target_batch_size=2, mpl=MPL
        )
        run = TrainRun(tmp_path / f"w{warmup}", tmp_path / f"b{warmup}", "f", init_weights=source_weights)
        bundle = train_federated(_sites(phantom_dir, target_dir), PHANTOM_LABELS, run, cfg, fed)
        dice[warmup] = _target_dice(bundle, target_dir, cfg)
    assert dice[1] > dice[3] + 0.01, dice


def test_train_modes_other_than_source_need_target_images(phantom_dir, tmp_path):
    labels_json = tmp_path / "labels.json"
    labels_json.write_text(json.dumps({str(k): v for k, v in PHANTOM_LABELS.items()}))
    args = ["train", "--images", str(phantom_dir / "images"), "--labels", str(phantom_dir / "labels")]
    result = CliRunner().invoke(app, [*args, "--label-names", str(labels_json), "--mode", "uda"])
    assert result.exit_code == 2 and "--target-images" in result.output
