"""Shared fixtures: real data location, synthetic phantoms and a tiny bundle trained on them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from models.bundle import Bundle
from models.phantom import PHANTOM_LABELS, PHANTOM_NETWORK, PHANTOM_PATCH, PHANTOM_SPACING, write_phantoms
from trainer.config import TrainConfig
from trainer.data import load_case
from trainer.train import TrainRun, train_source

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

if "OMP_NUM_THREADS" not in os.environ:  # a machine shared with other work sets its own
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """``../shared/data`` beside the repository; tests that need it skip without it."""
    if not DATA.is_dir():
        pytest.skip(f"real data not found at {DATA}")
    return DATA


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory) -> Path:
    """Source-domain phantoms: images/ and labels/."""
    folder = tmp_path_factory.mktemp("phantoms")
    write_phantoms(folder, 8, seed=0)
    return folder


@pytest.fixture(scope="session")
def tiny_config() -> TrainConfig:
    return TrainConfig(
        target_spacing=PHANTOM_SPACING,
        patch_size=PHANTOM_PATCH,
        network=PHANTOM_NETWORK,
        steps=150,
        batch_size=4,
        lr=1e-2,
        val_every=75,
        mask_block=(2, 8, 8),
        random_convolution_prob=0.0,  # a source model that the phantoms' scanner shift can still fool
        location_scale_prob=0.0,
    )


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, phantom_dir, tiny_config) -> Bundle:
    """A 3-class bundle trained for a few seconds on phantoms (validation Dice in its card)."""
    images = sorted((phantom_dir / "images").iterdir())
    cases = [
        load_case(
            p,
            phantom_dir / "labels" / p.name,
            spacing=tiny_config.target_spacing,
            normalisation=tiny_config.normalisation,
            n_classes=3,
        )
        for p in images
    ]
    out = tmp_path_factory.mktemp("bundles")
    return train_source(
        cases[:6],
        cases[6:],
        PHANTOM_LABELS,
        TrainRun(out / "work", out / "phantom", "phantom"),
        tiny_config,
    )
