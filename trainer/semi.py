"""``--mode semi``: a few labelled scans of one domain and many unlabelled scans of several unnamed domains.

Mixed-domain semi-supervised training after UST-RUN (Ma et al., "Unleashing the Power of Intermediate Domains
for Mixed Domain Semi-Supervised Medical Image Segmentation", IEEE TMI 2025), on global-local views with the
masked pseudo-labelling of test-time ``mpl`` (:mod:`models.mpl`). Scans to label or paste are only flipped,
rotated and scaled: the teacher labels them in their own appearance. Every step, for each unlabelled scan drawn:
- a scan to paste, labelled or from the pool of reliable unlabelled scans, has the low-frequency amplitude of
  its spectrum moved towards the unlabelled scan's, in the student's copy, by a random share of at most the
  training progress (random-amplitude MixUp);
- unified copy-paste makes two intermediate scans, a box of the pasted scan in the unlabelled one and the
  reverse; the student learns them (with a stronger appearance perturbation of the unlabelled part) from the
  labels, or the teacher's pseudo-labels, mixed the same way;
- symmetric guidance: the teacher labels both intermediate scans; each unlabelled voxel takes the label it got
  in the one that holds it (inside the box: pasted around; outside: around the pasted box), and counts only
  where that label agrees with the teacher's label of the plain scan; the student learns the strongly
  perturbed plain scan from these merged labels;
- a scan whose pseudo-labels the student already reproduces joins the reliable pool of the newest such scans;
- the scan it reproduces worst is kept, and the next step pastes a labelled scan into it, in the box that covers
  both scans' structures (:class:`HardestScan`).
The labelled scans are learned as the labelled-only recipe learns them (its batch, augmentation and loss, weight
one); the EMA teacher is the shipped model.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import fields

import numpy as np
import torch
from monai.losses import DiceCELoss

from models.bundle import Bundle
from models.mpl import PseudoLabels, ema_update, mpl_pseudo_labels, mpl_student_loss
from models.network import GlobalLocalUNet
from models.sampling import Views
from models.terms import TrainMode
from trainer.augment import augment, strong_augmentation, weak_augmentation
from trainer.config import SemiConfig, TrainConfig
from trainer.data import TrainingCase, source_volume_ranges
from trainer.mixing import aligned_views, amplitude_mix, cutmix_box, fit_to, paste
from trainer.train import (
    BEST,
    HISTORY,
    LAST,
    StepProgress,
    TrainRun,
    keep_best,
    one_cycle,
    resume_checkpoint,
    save_checkpoint,
    supervised_loss,
    validate,
    view_batches,
)

RULE = (
    "UST-RUN (Ma et al., IEEE TMI 2025): unified copy-paste between labelled and unlabelled scans, symmetric "
    "guidance from the intermediate scans' pseudo-labels, training-progress-aware random-amplitude MixUp, a pool "
    "of reliable unlabelled scans; masked pseudo-labelling with global-local views (MAPSeg, CVPR 2024)"
)


def rampup(progress: float, length: float) -> float:
    """Sigmoid ramp from 0 to 1 over the first ``length`` share of training (Laine and Aila, ICLR 2017)."""
    if length <= 0:
        return 1.0
    t = min(max(progress / length, 0.0), 1.0)
    return math.exp(-5.0 * (1.0 - t) ** 2)


def hardness(student_labels: torch.Tensor, teacher_labels: torch.Tensor, n_classes: int) -> list[float]:
    """Per scan: 1 - mean Dice over the structures either labels; 1 when neither finds any structure."""
    out = []
    for s, t in zip(student_labels, teacher_labels, strict=True):
        dices = []
        for c in range(1, n_classes):
            a, b = s == c, t == c
            total = int(a.sum() + b.sum())
            if total:
                dices.append(2.0 * float((a & b).sum()) / total)
        out.append(1.0 - float(np.mean(dices)) if dices else 1.0)
    return out


class ReliablePool:
    """Unlabelled scans (by index) whose pseudo-labels the student reproduced within ``reliable_hardness``; the
    newest ``reliable_pool`` are kept, so the pool follows the student's progress."""

    def __init__(self, cfg: SemiConfig, state: dict | None = None) -> None:
        self.size, self.threshold = cfg.reliable_pool, cfg.reliable_hardness
        self.members: list[int] = list((state or {}).get("members", []))

    def update(self, indices: Sequence[int], scores: Sequence[float]) -> None:
        """Admit the scans whose hardness is below the threshold, newest first; a scan already kept moves up."""
        new = [int(i) for i, h in zip(indices, scores, strict=True) if h < self.threshold]
        self.members = (new + [i for i in self.members if i not in new])[: self.size]

    def state(self) -> dict:
        """What a checkpoint keeps."""
        return {"members": self.members}


def cover_box(region: torch.Tensor, rng: np.random.Generator, semi: SemiConfig) -> torch.Tensor:
    """A (z, y, x) mask of ones in the smallest in-plane box, through all slices, around the voxels of
    ``region``; a random copy-paste box when the region is empty."""
    ys, xs = region.any(dim=(0, 2)).nonzero()[:, 0], region.any(dim=(0, 1)).nonzero()[:, 0]
    if not len(ys):
        box = cutmix_box(tuple(region.shape), rng, semi.box_area, semi.box_aspect)
        return torch.from_numpy(box).to(region.device) > 0
    mask = torch.zeros_like(region, dtype=torch.bool)
    mask[:, int(ys.min()) : int(ys.max()) + 1, int(xs.min()) : int(xs.max()) + 1] = True
    return mask


class HardestScan:
    """UST-RUN's step for the least reliable unlabelled scan.

    Each step keeps the plain views of the drawn unlabelled scan whose pseudo-labels the student reproduced
    worst, with the teacher's labels of them. The next step pastes a labelled scan's views into it, inside the box
    that covers the structures of both (reference labels, full weight, inside; the kept pseudo-labels outside), and
    the student learns it beside the copy-paste scans.
    """

    def __init__(self, state: dict | None = None) -> None:
        state = state or {}
        self.views: Views | None = state.get("views")
        self.labels: PseudoLabels | None = state.get("labels")

    def remember(self, views: Views, labels: PseudoLabels, scores: Sequence[float]) -> None:
        """Keep the scan of the batch with the highest hardness."""
        j = int(np.argmax(scores))
        self.views = Views(*(t[j : j + 1].detach() for t in (views.local, views.global_view, views.box)))
        self.labels = PseudoLabels(
            *(getattr(labels, f.name)[j : j + 1].detach() for f in fields(PseudoLabels))
        )

    def mixed(
        self, lab: Views, rng: np.random.Generator, semi: SemiConfig
    ) -> tuple[Views, PseudoLabels] | None:
        """The kept scan with one of ``lab``'s labelled views pasted in, and its labels; None before any step."""
        if self.views is None or self.labels is None:
            return None
        device = lab.local.device
        views, labels = self.views.to(device), self.labels
        k = int(rng.integers(len(lab.local)))
        own = {"local": labels.local.to(device), "global": labels.global_.to(device)}
        ref = {"local": lab.local_labels[k : k + 1, 0], "global": lab.global_labels[k : k + 1, 0]}
        boxes = {n: cover_box((own[n][0] > 0) | (ref[n][0] > 0), rng, semi)[None] for n in own}
        inside = {"local": lab.local[k : k + 1], "global": lab.global_view[k : k + 1]}
        mixed = Views(
            torch.where(boxes["local"][:, None], inside["local"], views.local),
            torch.where(boxes["global"][:, None], inside["global"], views.global_view),
            views.box,
        )
        weights = {"local": labels.local_weight.to(device), "global": labels.global_weight.to(device)}
        mixed_labels = PseudoLabels(
            *(torch.where(boxes[n], ref[n], own[n]) for n in ("local", "global")),
            *(torch.where(boxes[n], torch.ones_like(weights[n]), weights[n]) for n in ("local", "global")),
            labels.teacher_logits.to(device),
        )
        return mixed, mixed_labels

    def state(self) -> dict:
        """What a checkpoint keeps (on the CPU)."""
        if self.views is None or self.labels is None:
            return {}
        return {
            "views": self.views.to("cpu"),
            "labels": PseudoLabels(*(getattr(self.labels, f.name).cpu() for f in fields(PseudoLabels))),
        }


def _joined(first: PseudoLabels, second: PseudoLabels) -> PseudoLabels:
    """The labels of two batches as one."""
    return PseudoLabels(
        *(torch.cat([getattr(first, f.name), getattr(second, f.name)]) for f in fields(PseudoLabels))
    )


def _cat(views: Sequence[Views]) -> Views:
    return Views(*(torch.cat([getattr(v, f) for v in views]) for f in ("local", "global_view", "box")))


def _split(pseudo: PseudoLabels, parts: int) -> list[PseudoLabels]:
    fields = [
        t.chunk(parts) for t in (pseudo.local, pseudo.global_, pseudo.local_weight, pseudo.global_weight)
    ]
    logits = pseudo.teacher_logits.chunk(parts)
    return [PseudoLabels(*(f[k] for f in fields), logits[k]) for k in range(parts)]


def _where(mask: Views, inside: PseudoLabels, outside: PseudoLabels) -> PseudoLabels:
    """Labels and weights of ``inside`` where the box mask is one, of ``outside`` elsewhere."""
    m_l, m_g = mask.local[:, 0] > 0, mask.global_view[:, 0] > 0
    return PseudoLabels(
        torch.where(m_l, inside.local, outside.local),
        torch.where(m_g, inside.global_, outside.global_),
        torch.where(m_l, inside.local_weight, outside.local_weight),
        torch.where(m_g, inside.global_weight, outside.global_weight),
        outside.teacher_logits,
    )


def _per_scan(chosen: torch.Tensor, first: PseudoLabels, second: PseudoLabels) -> PseudoLabels:
    """Per scan of the batch: ``first``'s labels and weights where ``chosen`` (B,) is true, else ``second``'s."""
    c = chosen[:, None, None, None]
    return PseudoLabels(
        torch.where(c, first.local, second.local),
        torch.where(c, first.global_, second.global_),
        torch.where(c, first.local_weight, second.local_weight),
        torch.where(c, first.global_weight, second.global_weight),
        second.teacher_logits,
    )


def _labels(local: torch.Tensor, global_: torch.Tensor) -> PseudoLabels:
    """Reference labels as pseudo-labels of full weight."""
    ones_l, ones_g = (
        torch.ones_like(local, dtype=torch.float32),
        torch.ones_like(global_, dtype=torch.float32),
    )
    return PseudoLabels(local, global_, ones_l, ones_g, torch.empty(0))


class _Sampler:
    """Augmented unlabelled scans and the intermediate scans between them and labelled ones, as aligned views."""

    def __init__(
        self,
        labelled: Sequence[TrainingCase],
        unlabelled: Sequence[TrainingCase],
        cfg: TrainConfig,
        semi: SemiConfig,
        step: int,
    ) -> None:
        self.labelled, self.unlabelled, self.cfg, self.semi = labelled, unlabelled, cfg, semi
        self.rng = np.random.default_rng([cfg.seed, step])
        seed = int(self.rng.integers(2**31))
        # the teacher labels scans in their own appearance
        self.weak = weak_augmentation(seed, semi.zoom, semi.zoom_prob)
        self.strong = strong_augmentation(seed + 1)

    def _case(self, case: TrainingCase, labelled: bool) -> tuple[np.ndarray, np.ndarray | None]:
        if not self.cfg.augment:
            return case.image, case.labels if labelled else None
        return augment(self.weak, case.image, case.labels if labelled else None)

    def mixed_views(self, pool: ReliablePool, progress: float) -> tuple[list[int], list[Views], torch.Tensor]:
        """Unlabelled scans drawn, and the aligned views of: the plain scan, its strong perturbation, the two
        intermediate scans as the teacher sees them (plain) and as the student does (perturbed unlabelled part,
        amplitude-mixed pasted part), the pasted scan, its labels and the box; and which pasted scans carry
        reference labels."""
        cfg, semi, rng = self.cfg, self.semi, self.rng
        size = min(semi.unlabelled_batch_size, len(self.unlabelled))
        idx = [int(i) for i in rng.choice(len(self.unlabelled), size=size, replace=False)]
        stacks, centres, known = [], [], []
        for i in idx:
            u, _ = self._case(self.unlabelled[i], False)
            if pool.members and rng.random() < semi.reliable_share:
                donor, labels = self._case(
                    self.unlabelled[pool.members[rng.integers(len(pool.members))]], False
                )
                labels = np.zeros_like(donor, dtype=np.int64)
                known.append(False)
            else:
                donor, labels = self._case(self.labelled[rng.integers(len(self.labelled))], True)
                known.append(True)
            donor = fit_to(donor, u.shape, float(donor.min()))
            labels = fit_to(labels, u.shape, 0)
            styled = amplitude_mix(donor, u, float(rng.uniform(0.0, progress)), semi.amplitude_band)
            strong = self.strong({"image": u[None]})["image"][0]
            strong = np.asarray(strong, dtype=np.float32)
            box = cutmix_box(u.shape, rng, semi.box_area, semi.box_aspect)
            stacks.append(
                [
                    u,
                    strong,
                    paste(u, donor, box),  # unlabelled around a pasted box, as the teacher sees it
                    paste(donor, u, box),  # pasted around an unlabelled box
                    paste(strong, styled, box),  # as the student sees them
                    paste(styled, strong, box),
                    donor,
                    labels,
                    box,
                ]
            )
            fg = np.argwhere(labels > 0)
            centres.append(
                fg[rng.integers(len(fg))] if len(fg) and rng.random() < cfg.foreground_prob else None
            )
        maps = [False] * 7 + [True, True]
        views = aligned_views(stacks, cfg.patch_size, rng, maps=maps, centres=centres)
        return idx, views, torch.tensor(known)


def _unlabelled_loss(
    student: GlobalLocalUNet,
    teacher: GlobalLocalUNet,
    lab: Views,
    sampler: _Sampler,
    pool: ReliablePool,
    hardest: HardestScan,
    semi: SemiConfig,
    progress: float,
    generator: torch.Generator,
    device: str,
) -> tuple[torch.Tensor, dict[str, float]]:
    """One step's unlabelled terms: ramped (copy-paste both ways, with the last step's hardest scan pasted into,
    ``lab``'s labelled views in it, + ramped symmetric guidance); updates the pool and the hardest scan."""
    n_classes = student.config.out_channels
    idx, views, known = sampler.mixed_views(pool, progress)
    plain, strong, ul, lu, ul_s, lu_s, donor, ref, box = (v.to(device) for v in views)
    plain_l, ul_l, lu_l, donor_l = _split(
        mpl_pseudo_labels(teacher, _cat([plain, ul, lu, donor]), semi.mpl), 4
    )
    # the pasted scan's reference labels where it has them, else the teacher's
    pasted = _per_scan(
        known.to(device), _labels(ref.local[:, 0].long(), ref.global_view[:, 0].long()), donor_l
    )
    ul_views, ul_labels = ul_s, _where(box, pasted, plain_l)
    hardest_mix = hardest.mixed(lab, sampler.rng, semi)
    if hardest_mix is not None:  # one more intermediate scan: the hardest one around a labelled box
        ul_views, ul_labels = _cat([ul_s, hardest_mix[0]]), _joined(ul_labels, hardest_mix[1])
    copy_paste = mpl_student_loss(student, ul_views, ul_labels, semi.mpl, generator).loss
    copy_paste = (
        copy_paste + mpl_student_loss(student, lu_s, _where(box, plain_l, pasted), semi.mpl, generator).loss
    )
    merged = _where(box, lu_l, ul_l)
    agree_l = (merged.local == plain_l.local).float() * plain_l.local_weight
    agree_g = (merged.global_ == plain_l.global_).float() * plain_l.global_weight
    merged = PseudoLabels(
        merged.local,
        merged.global_,
        merged.local_weight * agree_l,
        merged.global_weight * agree_g,
        merged.teacher_logits,
    )
    guidance = mpl_student_loss(student, strong, merged, semi.mpl, generator).loss
    with torch.no_grad():
        student_labels = student(plain.local, plain.global_view, plain.box).global_logits.argmax(1)
    scores = hardness(student_labels, plain_l.global_, n_classes)
    pool.update(idx, scores)
    hardest.remember(plain, plain_l, scores)
    weight = semi.unlabelled_weight * rampup(progress, semi.rampup)
    loss = weight * (copy_paste + weight * guidance)
    stats = {
        "copy_paste": float(copy_paste.detach()),
        "guidance": float(guidance.detach()),
        "unlabelled_weight": weight,
        "confident_fraction": float(plain_l.local_weight.mean()),
        "guidance_fraction": float(merged.local_weight.mean()),
        "hardest": max(scores),
    }
    return loss, stats


def train_semi(
    labelled: Sequence[TrainingCase],
    unlabelled: Sequence[TrainingCase],
    val_cases: Sequence[TrainingCase],
    labels: dict[int, str],
    run: TrainRun,
    cfg: TrainConfig | None = None,
    semi: SemiConfig | None = None,
    progress: StepProgress | None = None,
) -> Bundle:
    """Train on ``labelled`` scans of one domain and ``unlabelled`` scans of any domains; writes ``run``'s bundle.

    Checkpoints student, teacher, optimiser, reliable pool and history into the run's work folder every
    ``cfg.val_every`` steps and resumes from there. The bundle holds the teacher: with validation cases (labelled,
    of the labelled domain) its weights of the best validation Dice, else the last. ``progress`` hears the steps
    done after every step.
    """
    cfg = cfg or TrainConfig()
    semi = semi or SemiConfig()  # no pseudo-label clean-up: an intermediate scan holds parts of two organs
    if not labelled or not unlabelled:
        raise ValueError("semi-supervised training needs labelled and unlabelled scans")
    progress = progress or (lambda step, status: None)
    work = run.work()
    student = run.network(cfg, len(labels))
    teacher = GlobalLocalUNet(student.config).to(run.device)
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad_(False)
    opt, sched = one_cycle(student, cfg)
    ckpt = resume_checkpoint(work / LAST, student, opt, sched)
    if ckpt:
        teacher.load_state_dict(ckpt["teacher"])
    step, history = ckpt.get("step", 0), ckpt.get("history", [])
    best, elapsed = ckpt.get("best", {"dice_mean": -1.0}), ckpt.get("seconds", 0.0)
    pool, hardest = ReliablePool(semi, ckpt.get("pool")), HardestScan(ckpt.get("hardest"))
    generator = torch.Generator().manual_seed(cfg.seed)
    if ckpt:
        generator.set_state(ckpt["mask_generator"])
    sampler = _Sampler(labelled, unlabelled, cfg, semi, step)
    labelled_batches = view_batches(labelled, cfg, labelled=True, start_step=step)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    student.train()
    teacher.eval()
    start = time.perf_counter()
    progress(step, "resumed" if step else "")
    while step < cfg.steps:
        lab = next(labelled_batches).to(run.device)
        supervised = supervised_loss(student, lab, cfg, loss_fn)  # the labelled-only recipe's loss and batch
        unlabelled_terms, stats = _unlabelled_loss(
            student,
            teacher,
            lab,
            sampler,
            pool,
            hardest,
            semi,
            step / cfg.steps,
            generator,
            run.device,
        )
        loss = supervised + unlabelled_terms
        stats["supervised"] = float(supervised.detach())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        ema_update(teacher, student, semi.mpl.ema)
        step += 1
        if step % cfg.val_every == 0 or step == cfg.steps:
            seconds = round(elapsed + time.perf_counter() - start, 1)
            entry = {
                "step": step,
                "loss": loss.item(),
                **stats,
                "reliable": len(pool.members),
                "seconds": seconds,
            }
            if val_cases:
                entry |= validate(teacher, val_cases, cfg.patch_size, len(labels))
                teacher.eval()
                if entry["dice_mean"] > best["dice_mean"]:
                    best = {k: v for k, v in entry.items() if k == "step" or k.startswith("dice")}
                    torch.save(teacher.state_dict(), work / BEST)
            history.append(entry)
            state = {"net": student.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}
            state |= {"teacher": teacher.state_dict(), "mask_generator": generator.get_state()}
            state |= {
                "step": step,
                "best": best,
                "history": history,
                "pool": pool.state(),
                "hardest": hardest.state(),
                "seconds": seconds,
            }
            save_checkpoint(work / LAST, state)
            (work / HISTORY).write_text(json.dumps(history, indent=2))
        status = f"loss {loss.item():.3f}, {len(pool.members)} reliable"
        progress(step, status + (f", best Dice {best['dice_mean']:.3f}" if val_cases else ""))
    split = "held-out labelled cases of the labelled domain, model grid"
    validation = keep_best(teacher, work, best, split if val_cases else None)
    return run.write_bundle(
        teacher,
        cfg,
        labels,
        source_volume_ranges(labelled, labels),
        description=f"Trained on {len(labelled)} labelled and {len(unlabelled)} unlabelled scans (semi)",
        training={
            "mode": TrainMode.SEMI.value,
            "rule": RULE,
            "labelled_cases": [c.case for c in labelled],
            "unlabelled_cases": [c.case for c in unlabelled],
            "val_cases": [c.case for c in val_cases],
            "weights": f"EMA teacher, best validation Dice (step {best['step']})"
            if val_cases
            else f"EMA teacher, last (step {step})",
            "semi": semi.model_dump(mode="json"),
        },
        validation=validation,
        seconds=elapsed + time.perf_counter() - start,
    )
