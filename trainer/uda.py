"""``--mode uda``: labelled source and unlabelled target scans trained together (MAPSeg's centralised setting).

Masked-autoencoder pretraining on source and target scans, then joint training: the supervised loss on
labelled source views plus the masked pseudo-label loss of :mod:`models.mpl` on unlabelled target views, whose
labels come from an EMA teacher. The bundle holds the teacher. Target labels are never read: target cases are
stripped of any labels before training starts.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import replace

import torch
from monai.losses import DiceCELoss

from models.bundle import Bundle
from models.mpl import ema_update, mpl_pseudo_labels, mpl_student_loss
from models.terms import TrainMode
from trainer.config import TrainConfig, UdaConfig
from trainer.data import TrainingCase, source_volume_ranges
from trainer.train import (
    HISTORY,
    LAST,
    TrainRun,
    one_cycle,
    pretrain_mae,
    resume_checkpoint,
    save_checkpoint,
    supervised_loss,
    validate,
    view_batches,
)

PhaseProgress = Callable[[str, int, str], None]  # (phase, steps done, short status)
PRETRAINING, TRAINING = "pretraining", "training"
TARGET_RULE = "target labels never read: target scans are trained on unlabelled, with masked pseudo-labels"


def unlabelled(cases: Sequence[TrainingCase]) -> list[TrainingCase]:
    """The cases without their labels, so that no training step can read them."""
    return [TrainingCase(c.case, c.image, None, c.voxel_ml) for c in cases]


def mpl_weight_at(step: int, uda: UdaConfig) -> float:
    """Weight of the target's pseudo-label loss: 0 during the supervised warm-up, then ``uda.mpl_weight``."""
    return uda.mpl_weight if step >= uda.warmup_steps else 0.0


def train_uda(
    source_cases: Sequence[TrainingCase],
    target_cases: Sequence[TrainingCase],
    val_cases: Sequence[TrainingCase],
    labels: dict[int, str],
    run: TrainRun,
    cfg: TrainConfig | None = None,
    uda: UdaConfig | None = None,
    progress: PhaseProgress | None = None,
) -> Bundle:
    """Pretrain on source + target, then train on labelled source and unlabelled target scans; writes ``run``'s
    bundle.

    Resumes from the run's work folder (pretraining in ``mae/``, joint training from ``last.pt``); with the run's
    initial weights pretraining is skipped. ``val_cases`` (held-out labelled source scans) are scored with the
    teacher at every checkpoint for the history; the bundle keeps the last teacher. ``progress`` hears
    (phase, steps done, status) after every step.
    """
    cfg, uda = cfg or TrainConfig(), uda or UdaConfig()
    progress = progress or (lambda phase, step, status: None)
    work = run.work()
    target, mpl = unlabelled(target_cases), uda.mpl.with_anatomy(run.largest_component)
    if run.init_weights is None and uda.pretrain_steps:
        mae = pretrain_mae(
            unlabelled(source_cases) + target,
            work / "mae",
            cfg=cfg.model_copy(update={"steps": uda.pretrain_steps}),
            device=run.device,
            progress=lambda step, status: progress(PRETRAINING, step, status),
        )
        run = replace(run, init_weights=mae)
    student = run.network(cfg, len(labels))
    teacher = copy.deepcopy(student).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    opt, sched = one_cycle(student, cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    ckpt = resume_checkpoint(work / LAST, student, opt, sched)
    if ckpt:
        teacher.load_state_dict(ckpt["teacher"])
        gen.set_state(ckpt["mask_generator"])
    step, history, elapsed = ckpt.get("step", 0), ckpt.get("history", []), ckpt.get("seconds", 0.0)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    source_batches = view_batches(source_cases, cfg, labelled=True, start_step=step)
    # a stream of its own (another seed), unaugmented: teacher and student see the same target views
    target_cfg = cfg.model_copy(
        update={"batch_size": uda.target_batch_size, "augment": False, "seed": cfg.seed + 1}
    )
    target_batches = view_batches(target, target_cfg, labelled=False, start_step=step)
    student.train()
    started = time.perf_counter()
    progress(TRAINING, step, "resumed" if step else "")
    while step < cfg.steps:
        loss = supervised_loss(student, next(source_batches).to(run.device), cfg, loss_fn)
        weight, mpl_loss, agreement = mpl_weight_at(step, uda), 0.0, float("nan")
        if weight:
            v = next(target_batches).to(run.device)
            pseudo = mpl_pseudo_labels(teacher, v, mpl)
            mpl_loss, agreement = mpl_student_loss(student, v, pseudo, mpl, gen)
            loss = loss + weight * mpl_loss
            mpl_loss = float(mpl_loss.detach())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        ema_update(teacher, student, mpl.ema)
        step += 1
        if step % cfg.val_every == 0 or step == cfg.steps:
            seconds = elapsed + time.perf_counter() - started
            entry = {
                "step": step,
                "loss": float(loss.detach()),
                "mpl_loss": mpl_loss,
                "seconds": round(seconds, 1),
            }
            entry |= {"agreement": agreement} if weight else {}
            if val_cases:
                entry |= validate(teacher, val_cases, cfg.patch_size, len(labels))
                teacher.eval()
            history.append(entry)
            state = {"net": student.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}
            state |= {"teacher": teacher.state_dict(), "mask_generator": gen.get_state()}
            save_checkpoint(work / LAST, {**state, "step": step, "history": history, "seconds": seconds})
            (work / HISTORY).write_text(json.dumps(history, indent=2))
        progress(
            TRAINING, step, f"loss {float(loss.detach()):.3f}" + (f", mpl {mpl_loss:.3f}" if weight else "")
        )
    last = history[-1] if history else {}
    validation = (
        {"split": "held-out source cases, model grid (the teacher, last step)", **last}
        if val_cases
        else {"split": "none: no held-out source cases"}
    )
    validation["target"] = "not scored: " + TARGET_RULE
    return run.write_bundle(
        teacher,
        cfg,
        labels,
        source_volume_ranges(source_cases, labels),
        description=f"UDA model: {len(source_cases)} labelled source and {len(target)} unlabelled target scans",
        training={
            "mode": TrainMode.UDA.value,
            "rule": TARGET_RULE,
            "train_cases": [c.case for c in source_cases],
            "target_cases": [c.case for c in target],
            "val_cases": [c.case for c in val_cases],
            "weights": f"EMA teacher, last (step {step})",
            "uda": uda.model_copy(update={"mpl": mpl}).model_dump(mode="json"),
        },
        validation=validation,
        seconds=elapsed + time.perf_counter() - started,
    )
