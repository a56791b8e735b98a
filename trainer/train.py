"""Offline training: masked-autoencoder pretraining and supervised source training, resumable and seeded."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from pydantic import BaseModel
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm import tqdm

from models.bundle import Bundle, ModelCard, save_bundle
from models.inference import predict_volume, torch_predictor
from models.network import GlobalLocalUNet, NetworkConfig, cosine_consistency
from models.postprocessing import LargestComponent
from models.preprocessing import Normalisation
from models.sampling import block_mask, make_views
from trainer.augment import augment, training_augmentation
from trainer.data import TrainingCase, source_volume_ranges


class TrainConfig(BaseModel):
    """Hyper-parameters of source training and pretraining; the defaults are the shipped settings."""

    target_spacing: tuple[float, float, float] = (1.8, 1.8, 8.0)
    patch_size: tuple[int, int, int] = (16, 112, 112)
    network: NetworkConfig = NetworkConfig(channels=(12, 24, 48, 96))
    normalisation: Normalisation = Normalisation()
    steps: int = 5000
    batch_size: int = 8
    lr: float = 2e-3
    weight_decay: float = 1e-5
    foreground_prob: float = 0.7
    global_weight: float = 0.5
    cosine_weight: float = 0.1
    val_every: int = 250
    mask_ratio: float = 0.7
    mask_block: tuple[int, int, int] = (2, 16, 16)
    augment: bool = True
    random_convolution_prob: float = 0.8
    histogram_shift_prob: float = 0.0
    seed: int = 0
    workers: int = 0


def mean_dice(pred: np.ndarray, target: np.ndarray, n_classes: int) -> list[float]:
    """Dice per foreground class (NaN where the class is absent in both)."""
    out = []
    for k in range(1, n_classes):
        p, t = pred == k, target == k
        denom = p.sum() + t.sum()
        out.append(float(2 * np.logical_and(p, t).sum() / denom) if denom else float("nan"))
    return out


def validate(net: GlobalLocalUNet, cases: Sequence[TrainingCase], patch, n_classes: int) -> dict[str, float]:
    """Dice per class and mean on the model grid of labelled validation cases."""
    net.eval()
    predict = torch_predictor(net)
    scores = np.array(
        [mean_dice(predict_volume(c.image, predict, patch).argmax(0), c.labels, n_classes) for c in cases]
    )
    per_class = np.nanmean(scores, axis=0)
    net.train()
    return {
        "dice_mean": float(np.nanmean(per_class)),
        **{f"dice_{k + 1}": float(v) for k, v in enumerate(per_class)},
    }


def _checkpoint(path: Path, net, opt, sched, step: int, best: dict, history: list) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(
        {
            "net": net.state_dict(),
            "opt": opt.state_dict(),
            "sched": sched.state_dict(),
            "step": step,
            "best": best,
            "history": history,
        },
        tmp,
    )
    tmp.replace(path)


class ViewStream(IterableDataset):
    """Endless batches of augmented global-local views; each data-loader worker draws its own random stream."""

    def __init__(self, cases: Sequence[TrainingCase], cfg: TrainConfig, labelled: bool, start_step: int = 0):
        self.cases, self.cfg, self.labelled, self.start_step = cases, cfg, labelled, start_step

    def __iter__(self):
        info = get_worker_info()
        worker = info.id if info else 0
        if info:
            torch.set_num_threads(1)  # many workers, one core each
        cfg = self.cfg
        rng = np.random.default_rng([cfg.seed, self.start_step, worker])
        aug = training_augmentation(
            int(rng.integers(2**31)), cfg.random_convolution_prob, cfg.histogram_shift_prob
        )
        while True:
            idx = rng.choice(len(self.cases), size=cfg.batch_size, replace=len(self.cases) < cfg.batch_size)
            imgs, labs = [], []
            for i in idx:
                im, lab = self.cases[i].image, self.cases[i].labels if self.labelled else None
                if cfg.augment:
                    im, lab = augment(aug, im, lab)
                imgs.append(im)
                labs.append(lab)
            yield make_views(imgs, cfg.patch_size, rng, labs if self.labelled else None, cfg.foreground_prob)


def view_batches(cases: Sequence[TrainingCase], cfg: TrainConfig, labelled: bool, start_step: int = 0):
    """Iterator over :class:`ViewStream` batches, prepared by ``cfg.workers`` processes (0: in this one)."""
    loader = DataLoader(
        ViewStream(cases, cfg, labelled, start_step),
        batch_size=None,
        num_workers=cfg.workers,
        prefetch_factor=4 if cfg.workers else None,
    )
    return iter(loader)


def train_source(
    train_cases: Sequence[TrainingCase],
    val_cases: Sequence[TrainingCase],
    labels: dict[int, str],
    work_dir: str | Path,
    out_bundle: str | Path,
    name: str,
    cfg: TrainConfig | None = None,
    init_weights: str | Path | None = None,
    training_summary: dict | None = None,
    version: str = "1",
    device: str = "cpu",
    largest_component: LargestComponent = LargestComponent.off,
) -> Bundle:
    """Supervised training on labelled source cases; keeps the best validation Dice and writes a bundle.

    ``largest_component`` goes to the card: the clean-up the anatomy allows (``foreground`` for one heart).
    """
    cfg = cfg or TrainConfig()
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    net = GlobalLocalUNet(cfg.network.model_copy(update={"out_channels": len(labels)}))
    if init_weights:
        state = torch.load(init_weights, map_location="cpu", weights_only=True)
        state = state.get("net", state)
        own = net.state_dict()
        net.load_state_dict(
            {k: v for k, v in state.items() if k in own and v.shape == own[k].shape}, strict=False
        )
    net.to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=0.05)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    step, best, history = 0, {"dice_mean": -1.0}, []
    last = work / "last.pt"
    if last.exists():
        ckpt = torch.load(last, map_location="cpu", weights_only=False)
        net.load_state_dict(ckpt["net"])
        opt.load_state_dict(ckpt["opt"])
        sched.load_state_dict(ckpt["sched"])
        step, best, history = ckpt["step"], ckpt["best"], ckpt["history"]
    net.train()
    start = time.perf_counter()
    batches = view_batches(train_cases, cfg, labelled=True, start_step=step)
    bar = tqdm(total=cfg.steps, initial=step, desc=f"train {name}", unit="step")
    while step < cfg.steps:
        v = next(batches).to(device)
        out = net(v.local, v.global_view, v.box)
        loss = loss_fn(out.local_logits, v.local_labels)
        loss = loss + cfg.global_weight * loss_fn(out.global_logits, v.global_labels)
        loss = loss + cfg.cosine_weight * cosine_consistency(out.local_features, out.global_context)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{float(loss):.3f}", best=f"{best['dice_mean']:.3f}")
        if step % cfg.val_every == 0 or step == cfg.steps:
            metrics = (
                validate(net, val_cases, cfg.patch_size, len(labels)) if val_cases else {"dice_mean": 0.0}
            )
            history.append({"step": step, "loss": float(loss), **metrics})
            if metrics["dice_mean"] > best["dice_mean"]:
                best = {"step": step, **metrics}
                torch.save(net.state_dict(), work / "best.pt")
            _checkpoint(last, net, opt, sched, step, best, history)
            (work / "history.json").write_text(json.dumps(history, indent=2))
    bar.close()
    net.cpu().load_state_dict(torch.load(work / "best.pt", map_location="cpu", weights_only=True))
    card = ModelCard(
        name=name,
        version=version,
        description=f"Source model trained on {len(train_cases)} labelled scans",
        labels=labels,
        target_spacing=cfg.target_spacing,
        patch_size=cfg.patch_size,
        normalisation=cfg.normalisation,
        network=net.config,
        training={
            **(training_summary or {}),
            "train_cases": [c.case for c in train_cases],
            "val_cases": [c.case for c in val_cases],
            "config": cfg.model_dump(mode="json"),
            "pretrained_from": str(init_weights) if init_weights else None,
            "seconds": round(time.perf_counter() - start, 1),
            "device": torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu",
        },
        validation={"split": "held-out source cases, model grid", **best},
        label_volumes_ml=source_volume_ranges(train_cases, labels, cfg.target_spacing),
        largest_component=largest_component,
    )
    return save_bundle(net, card, out_bundle)


def pretrain_mae(
    cases: Sequence[TrainingCase], work_dir: str | Path, cfg: TrainConfig | None = None, device: str = "cpu"
) -> Path:
    """Multi-scale masked-autoencoder pretraining: reconstruct masked 3D blocks of the local and global views."""
    cfg = cfg or TrainConfig()
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    net = GlobalLocalUNet(cfg.network).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    batches = view_batches(cases, cfg, labelled=False)
    net.train()
    for step in tqdm(range(cfg.steps), desc="pretrain (MAE)", unit="step"):
        v = next(batches)
        m_l = block_mask(v.local.shape, cfg.mask_block, cfg.mask_ratio, gen)
        m_g = block_mask(v.global_view.shape, cfg.mask_block, cfg.mask_ratio, gen)
        v, m_l, m_g = v.to(device), m_l.to(device), m_g.to(device)
        rec_l, rec_g = net.reconstruct(v.local * m_l, v.global_view * m_g, v.box)
        hidden_l, hidden_g = 1 - m_l, 1 - m_g
        loss = (F.mse_loss(rec_l, v.local, reduction="none") * hidden_l).sum() / hidden_l.sum().clamp_min(1)
        loss = loss + (
            F.mse_loss(rec_g, v.global_view, reduction="none") * hidden_g
        ).sum() / hidden_g.sum().clamp_min(1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % 100 == 0 or step + 1 == cfg.steps:
            torch.save(net.state_dict(), work / "mae.pt")
    return work / "mae.pt"
