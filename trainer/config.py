"""Hyper-parameters of training (source, uda, semi, federated) and pretraining, without torch: the CLI reads its
defaults from here."""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, Field, model_validator

from models.mpl_config import MplConfig
from models.network_config import NetworkConfig
from models.preprocessing import Normalisation, Spacing

PRETRAIN_STEPS = 500  # the shipped masked-autoencoder pretraining length
RECIPE_ZOOM, RECIPE_ZOOM_PROB = (0.85, 1.2), 0.3  # the recipe's in-plane scaling: factors and probability


class TrainConfig(BaseModel):
    """Hyper-parameters of source training and pretraining; the defaults are the shipped recipe (the slice-wise
    plan on each scan's own slices, GIN and location-scale augmentation, 2000 steps of 16 slices)."""

    target_spacing: Spacing = (1.8, 1.8, 0.0)  # 0: each scan keeps its own slices
    patch_size: tuple[int, int, int] = (1, 128, 128)
    network: NetworkConfig = NetworkConfig(
        channels=(16, 32, 64, 128, 256),
        kernels=((1, 3, 3),) * 5,
        strides=((1, 1, 1),) + ((1, 2, 2),) * 4,
        spatial_dims=2,
    )
    normalisation: Normalisation = Normalisation()
    steps: int = 2000
    batch_size: int = 16
    lr: float = 2e-3
    weight_decay: float = 1e-5
    foreground_prob: float = 0.7
    global_weight: float = 0.5
    cosine_weight: float = 0.1
    val_every: int = 250  # source training: steps between validations, each followed by a checkpoint
    checkpoint_every: int = 100  # pretraining: steps between checkpoints
    mask_ratio: float = 0.7
    mask_block: tuple[int, int, int] = (2, 16, 16)
    augment: bool = True
    random_convolution_prob: float = 0.8
    histogram_shift_prob: float = 0.0
    location_scale_prob: float = 0.5
    contraction_prob: float = 0.0  # labelled scans contracted, slice by slice, around ...
    contraction_label: int = 0  # ... this structure (RandRadialContractiond); 0: none
    seed: int = 0
    workers: int = 0

    @model_validator(mode="after")
    def _contraction_has_a_centre(self) -> TrainConfig:
        if self.contraction_prob > 0 and self.contraction_label < 1:
            raise ValueError("contraction_prob needs contraction_label, the structure to contract around")
        return self


class Plan(StrEnum):
    """A network plan: the grid, patch, batch and network that travel together into a card."""

    SLICE = "2d"  # slice-wise 2D U-Net on own slices: TrainConfig's defaults, the shipped bundles
    VOLUMETRIC = "3d"  # the anisotropic 3D global-local U-Net on 8 mm slices; a step costs about 5x a 2D one


PLANS: dict[Plan, dict] = {  # TrainConfig fields of each plan over the defaults
    Plan.SLICE: {},
    Plan.VOLUMETRIC: {
        "target_spacing": (1.8, 1.8, 8.0),
        "patch_size": (16, 112, 112),
        "batch_size": 8,
        "network": NetworkConfig(channels=(12, 24, 48, 96)),
    },
}


class UdaConfig(BaseModel):
    """Labelled source and unlabelled target scans trained together (MAPSeg's centralised setting)."""

    pretrain_steps: int = PRETRAIN_STEPS  # masked-autoencoder steps on source + target before joint training
    warmup_steps: int = 500  # supervised source steps before the target's pseudo-labels count
    mpl_weight: float = 1.0  # weight of the target's masked pseudo-label loss beside the supervised loss
    target_batch_size: int = 4
    mpl: MplConfig = MplConfig(ema=0.99)


class FederatedConfig(BaseModel):
    """Sites that keep their scans and share weights by FedAvg rounds (MAPSeg's federated setting).

    Every round each site starts from the global weights and runs ``local_steps``: masked-autoencoder steps in the
    first ``mae_rounds``, then supervised steps at the labelled site and masked pseudo-labelling at the others,
    which join after ``warmup_rounds`` (their pseudo-labels need a teacher that has seen labels).
    """

    mae_rounds: int = 5
    rounds: int = 40  # segmentation rounds after the masked-autoencoder rounds
    warmup_rounds: int = 5
    local_steps: int = 100
    target_batch_size: int = 4
    mpl: MplConfig = MplConfig(ema=0.99)


class SemiConfig(BaseModel):
    """Settings of ``--mode semi`` on top of :class:`TrainConfig`; the defaults follow UST-RUN's published ones
    where they apply (EMA 0.99, low-frequency band 0.01, boxes of 2-40% of a slice, a pool of 10 reliable scans),
    except the unlabelled weight and its ramp (UST-RUN: 1, over the whole run), set by the cardiac benchmark
    (docs/training.md, ``--mode semi``).
    """

    # unmasked views (the masked one is then a second plain view): 1 point above 70% block masks on the cardiac data
    mpl: MplConfig = MplConfig(ema=0.99, mask_ratio=0.0)
    # unlabelled scans a step (the labelled batch is TrainConfig's batch_size)
    unlabelled_batch_size: int = Field(2, ge=1)
    # copy-paste terms' weight once ramped up (symmetric guidance: squared)
    unlabelled_weight: float = Field(0.1, ge=0)
    # share of the steps over which the unlabelled weight rises (sigmoid ramp)
    rampup: float = Field(0.5, ge=0, le=1)
    amplitude_band: float = 0.01  # half-width of the low-frequency window, as a share of each axis
    box_area: tuple[float, float] = (0.02, 0.4)  # share of a slice the pasted box covers
    box_aspect: tuple[float, float] = (0.3, 1 / 0.3)
    # unlabelled scans whose pseudo-labels the student already reproduces
    reliable_pool: int = Field(10, ge=0)
    # 1 - student/teacher Dice below which a scan counts as reliable
    reliable_hardness: float = Field(0.1, ge=0, le=1)
    # share of pasted scans drawn from the reliable pool once it holds any
    reliable_share: float = Field(0.5, ge=0, le=1)
    zoom: tuple[float, float] = RECIPE_ZOOM  # in-plane scaling of the scans labelled and pasted
    zoom_prob: float = Field(RECIPE_ZOOM_PROB, ge=0, le=1)
