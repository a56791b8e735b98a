"""Offline training: masked-autoencoder pretraining and supervised source training, resumable and seeded."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from monai.transforms import Compose
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from models.bundle import CARD_FILE, Bundle, ModelCard, read_card, save_bundle
from models.guard import VolumeRanges, dice_per_class
from models.inference import predict_volume, torch_predictor
from models.network import GlobalLocalUNet, cosine_consistency
from models.postprocessing import LargestComponent, foreground_entropy
from models.sampling import Views, block_mask, make_views
from models.terms import TrainMode
from trainer.augment import augment, training_augmentation
from trainer.config import TrainConfig
from trainer.data import TrainingCase, source_volume_ranges

StepProgress = Callable[[int, str], None]  # (steps done, short status such as the loss)
LAST, BEST, HISTORY = "last.pt", "best.pt", "history.json"
MAE_LAST, MAE_WEIGHTS = "mae_last.pt", "mae.pt"


def validate(net: GlobalLocalUNet, cases: Sequence[TrainingCase], patch, n_classes: int) -> dict[str, float]:
    """Dice per class and mean on the model grid of labelled validation cases, and the network's mean
    foreground entropy on them (the reference of test-time ``mpl``'s shift gate, ``AdaptConfig.shift_ratio``)."""
    net.eval()
    predict = torch_predictor(net)
    scores, entropies = [], []
    for c in cases:
        probs = predict_volume(c.image, predict, patch)
        scores.append(dice_per_class(probs.argmax(0), c.labels, n_classes))
        entropies.append(foreground_entropy(probs))
    per_class = np.nanmean(np.array(scores), axis=0)
    net.train()
    return {
        "dice_mean": float(np.nanmean(per_class)),
        **{f"dice_{k + 1}": float(v) for k, v in enumerate(per_class)},
        "foreground_entropy": float(np.mean(entropies)),
    }


def keep_best(net: torch.nn.Module, work: Path, best: dict, split: str | None) -> dict:
    """Load the best validated weights of a run in ``work`` into ``net`` (on the CPU) and return the card's
    validation entry; with no held-out cases (``split`` None) ``net`` keeps the last step's weights."""
    net.cpu()
    if split is None:
        return {"split": "none: no held-out cases, the bundle holds the last step's weights"}
    net.load_state_dict(torch.load(work / BEST, map_location="cpu", weights_only=True))
    return {"split": split, **best}


def save_checkpoint(path: Path, state: dict) -> None:
    """``torch.save`` through a temporary file, so that an interrupted run never leaves half a checkpoint."""
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def resume_checkpoint(path: Path, net: torch.nn.Module, opt: torch.optim.Optimizer, sched=None) -> dict:
    """Restore network, optimiser (and schedule) from a checkpoint; returns the checkpoint, empty when none."""
    if not path.exists():
        return {}
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    net.load_state_dict(ckpt["net"])
    opt.load_state_dict(ckpt["opt"])
    if sched is not None:
        sched.load_state_dict(ckpt["sched"])
    return ckpt


def recipe_augmentation(cfg: TrainConfig, seed: int, cases: Sequence[TrainingCase]) -> Compose:
    """The augmentation of labelled scans that ``cfg`` names (radial contraction, random convolution, histogram
    curves, location-scale), for the structures that the label maps of ``cases`` hold."""
    labelled = [c.labels for c in cases if c.labels is not None]
    return training_augmentation(
        seed,
        cfg.random_convolution_prob,
        cfg.histogram_shift_prob,
        cfg.location_scale_prob,
        n_classes=max((int(lab.max()) + 1 for lab in labelled), default=1),
        contraction_prob=cfg.contraction_prob,
        contraction_label=cfg.contraction_label,
    )


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
        aug = recipe_augmentation(cfg, int(rng.integers(2**31)), self.cases)
        while True:
            idx = rng.choice(len(self.cases), size=cfg.batch_size, replace=len(self.cases) < cfg.batch_size)
            imgs, labs = [], []
            for i in idx:
                im, lab = self.cases[i].image, self.cases[i].labels if self.labelled else None
                if cfg.augment:
                    im, lab = augment(aug, im, lab)
                imgs.append(im)
                labs.append(lab)
            yield make_views(
                imgs,
                cfg.patch_size,
                rng,
                labels=labs if self.labelled else None,
                foreground_prob=cfg.foreground_prob,
            )


def view_batches(cases: Sequence[TrainingCase], cfg: TrainConfig, labelled: bool, start_step: int = 0):
    """Iterator over :class:`ViewStream` batches, prepared by ``cfg.workers`` processes (0: in this one)."""
    loader = DataLoader(
        ViewStream(cases, cfg, labelled, start_step),
        batch_size=None,
        num_workers=cfg.workers,
        prefetch_factor=4 if cfg.workers else None,
    )
    return iter(loader)


def supervised_loss(net: GlobalLocalUNet, v: Views, cfg: TrainConfig, loss_fn: DiceCELoss) -> torch.Tensor:
    """Dice + cross-entropy of the local and (``global_weight`` x) global heads, plus the cosine term."""
    out = net(v.local, v.global_view, v.box)
    loss = loss_fn(out.local_logits, v.local_labels)
    loss = loss + cfg.global_weight * loss_fn(out.global_logits, v.global_labels)
    return loss + cfg.cosine_weight * cosine_consistency(out.local_features, out.global_context)


def load_initial_weights(net: GlobalLocalUNet, path: str | Path | None) -> None:
    """Load the weights of ``path`` (MAE or bundle weights) whose names and shapes ``net`` shares; none: no-op."""
    if not path:
        return
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("net", state)
    own = net.state_dict()
    net.load_state_dict(
        {k: v for k, v in state.items() if k in own and v.shape == own[k].shape}, strict=False
    )


def earlier_stages(weights: str | Path | None) -> list[dict]:
    """The training stages behind initial ``weights`` that are a bundle's (its card beside them), oldest first
    (:meth:`models.bundle.ModelCard.training_stages`), so that a bundle trained in stages still tells its whole
    cost. Empty for MAE weights or none."""
    folder = Path(weights).parent if weights else None
    if folder is None or not (folder / CARD_FILE).is_file():
        return []
    return read_card(folder).training_stages()


def device_name(device: str) -> str:
    """The accelerator's name for the card, or ``cpu``."""
    return torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu"


@dataclass(frozen=True)
class TrainRun:
    """What every training mode shares: where it checkpoints (``work_dir``, resumed from), the bundle it writes
    (folder, name, version), the weights it starts from, the device, the clean-up its card names
    (``foreground`` for one heart), and ``summary``: what the card records of the data beside the mode's own
    facts. ``init_stages`` are the training stages behind ``init_weights``, read from their card when the run is
    set up, so that a broken card stops the run before training rather than after."""

    work_dir: Path
    out_bundle: Path
    name: str
    version: str = "1"
    init_weights: Path | None = None
    device: str = "cpu"
    largest_component: LargestComponent = LargestComponent.off
    summary: dict = field(default_factory=dict)
    init_stages: list[dict] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        object.__setattr__(self, "init_stages", earlier_stages(self.init_weights))

    def work(self) -> Path:
        """The checkpoint folder, created."""
        Path(self.work_dir).mkdir(parents=True, exist_ok=True)
        return Path(self.work_dir)

    def network(self, cfg: TrainConfig, n_classes: int) -> GlobalLocalUNet:
        """``cfg``'s network with ``n_classes`` outputs, from ``init_weights`` where given, on the device."""
        torch.manual_seed(cfg.seed)
        net = GlobalLocalUNet(cfg.network.model_copy(update={"out_channels": n_classes}))
        load_initial_weights(net, self.init_weights)
        return net.to(self.device)

    def write_bundle(
        self,
        net: GlobalLocalUNet,
        cfg: TrainConfig,
        labels: dict[int, str],
        label_volumes_ml: VolumeRanges,
        *,
        description: str,
        training: dict,
        validation: dict,
        seconds: float,
    ) -> Bundle:
        """Save ``net`` with its card: the mode's ``training`` facts beside the summary, the settings, the initial
        weights, the wall time and the device; ``label_volumes_ml`` from :func:`trainer.data.source_volume_ranges`.
        """
        card = ModelCard(
            name=self.name,
            version=self.version,
            description=description,
            labels=labels,
            target_spacing=cfg.target_spacing,
            patch_size=cfg.patch_size,
            normalisation=cfg.normalisation,
            network=net.config,
            training={
                **self.summary,
                **training,
                "config": cfg.model_dump(mode="json"),
                "pretrained_from": str(self.init_weights) if self.init_weights else None,
                "earlier_stages": self.init_stages,
                "seconds": round(seconds, 1),
                "device": device_name(self.device),
            },
            validation=validation,
            label_volumes_ml=label_volumes_ml,
            largest_component=self.largest_component,
        )
        return save_bundle(net.cpu(), card, self.out_bundle)


def one_cycle(net: torch.nn.Module, cfg: TrainConfig):
    """AdamW with the one-cycle schedule over ``cfg.steps`` that every segmentation mode trains with."""
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return opt, torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=0.05)


def train_source(
    train_cases: Sequence[TrainingCase],
    val_cases: Sequence[TrainingCase],
    labels: dict[int, str],
    run: TrainRun,
    cfg: TrainConfig | None = None,
    progress: StepProgress | None = None,
) -> Bundle:
    """Supervised training on labelled source cases; writes ``run``'s bundle and resumes from its work folder.

    With validation cases the bundle keeps the weights of the best validation Dice; without any it keeps the last
    step's weights and its card says so. ``progress`` hears the steps done after every step.
    """
    cfg = cfg or TrainConfig()
    progress = progress or (lambda step, status: None)
    work = run.work()
    net = run.network(cfg, len(labels))
    opt, sched = one_cycle(net, cfg)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    ckpt = resume_checkpoint(work / LAST, net, opt, sched)
    step, best, history = ckpt.get("step", 0), ckpt.get("best", {"dice_mean": -1.0}), ckpt.get("history", [])
    net.train()
    start = time.perf_counter() - ckpt.get("seconds", 0.0)  # training time before a resume counts too
    batches = view_batches(train_cases, cfg, labelled=True, start_step=step)
    progress(step, "resumed" if step else "")
    while step < cfg.steps:
        loss = supervised_loss(net, next(batches).to(run.device), cfg, loss_fn)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        step += 1
        if step % cfg.val_every == 0 or step == cfg.steps:
            entry = {"step": step, "seconds": round(time.perf_counter() - start, 1), "loss": loss.item()}
            if val_cases:
                entry |= validate(net, val_cases, cfg.patch_size, len(labels))
                if entry["dice_mean"] > best["dice_mean"]:
                    best = {k: v for k, v in entry.items() if k != "loss"}
                    torch.save(net.state_dict(), work / BEST)
            history.append(entry)
            state = {"net": net.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}
            seconds = time.perf_counter() - start
            save_checkpoint(
                work / LAST, {**state, "step": step, "best": best, "history": history, "seconds": seconds}
            )
            (work / HISTORY).write_text(json.dumps(history, indent=2))
        status = f"loss {loss.item():.3f}" + (f", best Dice {best['dice_mean']:.3f}" if val_cases else "")
        progress(step, status)
    validation = keep_best(net, work, best, "held-out source cases, model grid" if val_cases else None)
    return run.write_bundle(
        net,
        cfg,
        labels,
        source_volume_ranges(train_cases, labels),
        description=f"Source model trained on {len(train_cases)} labelled scans",
        training={
            "mode": TrainMode.SOURCE.value,
            "train_cases": [c.case for c in train_cases],
            "val_cases": [c.case for c in val_cases],
            "weights": f"best validation Dice (step {best['step']})" if val_cases else f"last (step {step})",
            "curve": [{k: h[k] for k in ("step", "seconds", "dice_mean") if k in h} for h in history],
        },
        validation=validation,
        seconds=time.perf_counter() - start,
    )


def mae_loss(net: GlobalLocalUNet, v: Views, cfg: TrainConfig, generator: torch.Generator) -> torch.Tensor:
    """Reconstruction error of the masked blocks of both views; the masks are drawn on the CPU from
    ``generator``."""
    dev = v.local.device
    m_l = block_mask(v.local.shape, cfg.mask_block, cfg.mask_ratio, generator).to(dev)
    m_g = block_mask(v.global_view.shape, cfg.mask_block, cfg.mask_ratio, generator).to(dev)
    rec_l, rec_g = net.reconstruct(v.local * m_l, v.global_view * m_g, v.box)
    hidden_l, hidden_g = 1 - m_l, 1 - m_g
    loss = (F.mse_loss(rec_l, v.local, reduction="none") * hidden_l).sum() / hidden_l.sum().clamp_min(1)
    return loss + (
        F.mse_loss(rec_g, v.global_view, reduction="none") * hidden_g
    ).sum() / hidden_g.sum().clamp_min(1)


def pretrain_mae(
    cases: Sequence[TrainingCase],
    work_dir: str | Path,
    *,
    cfg: TrainConfig | None = None,
    device: str = "cpu",
    progress: StepProgress | None = None,
) -> Path:
    """Multi-scale masked-autoencoder pretraining: reconstruct masked 3D blocks of the local and global views.

    Checkpoints into ``work_dir`` every ``cfg.checkpoint_every`` steps and resumes from there; returns the path of
    the network weights (``mae.pt``). ``progress`` hears the steps done after every step.
    """
    cfg = cfg or TrainConfig()
    progress = progress or (lambda step, status: None)
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    net = GlobalLocalUNet(cfg.network).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    ckpt = resume_checkpoint(work / MAE_LAST, net, opt)
    step = ckpt.get("step", 0)
    if ckpt:
        gen.set_state(ckpt["mask_generator"])
    batches = view_batches(cases, cfg, labelled=False, start_step=step)
    net.train()
    progress(step, "resumed" if step else "")
    while step < cfg.steps:
        loss = mae_loss(net, next(batches).to(device), cfg, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            state = {"net": net.state_dict(), "opt": opt.state_dict(), "mask_generator": gen.get_state()}
            save_checkpoint(work / MAE_LAST, {**state, "step": step})
        progress(step, f"loss {loss.item():.4f}")
    save_checkpoint(work / MAE_WEIGHTS, net.state_dict())
    return work / MAE_WEIGHTS
