"""One step of masked pseudo-labelling with global-local views (MAPSeg, CVPR 2024), shared by test-time ``mpl``
and the training modes.

An EMA teacher labels unmasked local patches and global views (:func:`mpl_pseudo_labels`); a student learns to
reproduce those labels from block-masked and unmasked views with the local and the global head, plus a
local-global cosine term (:func:`mpl_student_loss`); the teacher then follows the student (:func:`ema_update`).
No label is ever read.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.mpl_config import MplConfig
from models.network import GlobalLocalUNet, cosine_consistency, crop_resize
from models.postprocessing import LargestComponent, keep_largest_component
from models.sampling import Views, block_mask, mirror_views


@dataclass
class PseudoLabels:
    """The teacher's labels of a batch of views, the confidence weights that gate them and its local logits."""

    local: torch.Tensor  # (B, z, y, x)
    global_: torch.Tensor  # (B, z, y, x)
    local_weight: torch.Tensor  # 1 where the teacher is confident, else 0
    global_weight: torch.Tensor
    teacher_logits: torch.Tensor  # local logits on the plain views


class StudentLoss(NamedTuple):
    """The student's loss and its agreement with the pseudo-labels on its last view."""

    loss: torch.Tensor
    agreement: float


def pseudo_label_loss(
    logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, dice_weight: float
) -> torch.Tensor:
    """Confidence-weighted cross-entropy plus a soft Dice term that keeps small structures from being outvoted."""
    ce = F.cross_entropy(logits, target, reduction="none")
    loss = (ce * weight).sum() / weight.sum().clamp_min(1.0)
    if dice_weight:
        probs = torch.softmax(logits, 1)
        onehot = F.one_hot(target, logits.shape[1]).movedim(-1, 1).float()
        w = weight[:, None]
        dims = (0, 2, 3, 4)
        inter = (probs * onehot * w).sum(dims)
        denom = ((probs + onehot) * w).sum(dims)
        present = onehot.sum(dims)[1:] > 0
        dice = (2 * inter + 1e-5) / (denom + 1e-5)
        if present.any():
            loss = loss + dice_weight * (1 - dice[1:][present].mean())
    return loss


def clean_pseudo_labels(
    pseudo_local: torch.Tensor,
    pseudo_global: torch.Tensor,
    box: torch.Tensor,
    *,
    mode: LargestComponent,
    n_classes: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher labels with foreground outside the organ set to background: (local, global).

    The global view shows the whole scan, so its largest connected object decides where the organ is; a local
    patch keeps its foreground only inside that object, dilated by one to two global voxels.
    """
    if mode == LargestComponent.off:
        return pseudo_local, pseudo_global
    kept = np.stack(
        [keep_largest_component(g, n_classes, mode) for g in pseudo_global.cpu().numpy().astype(np.uint8)]
    )
    kept_global = torch.from_numpy(kept).to(pseudo_global)
    organ = F.max_pool3d((kept_global > 0).float()[:, None], (3, 5, 5), stride=1, padding=(1, 2, 2))
    inside = crop_resize(organ, box, pseudo_local.shape[1:])[:, 0] > 0
    return torch.where(inside, pseudo_local, torch.zeros_like(pseudo_local)), kept_global


@torch.no_grad()
def teacher_probabilities(
    teacher: GlobalLocalUNet,
    local: torch.Tensor,
    gview: torch.Tensor,
    box: torch.Tensor,
    *,
    flips: Sequence[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The teacher's local and global class probabilities, averaged over the plain views and their mirror images
    along each of ``flips``, and its local logits on the plain views."""
    out = teacher(local, gview, box)
    p_local, p_global = torch.softmax(out.local_logits, 1), torch.softmax(out.global_logits, 1)
    for axis in flips:
        mirrored = teacher(*mirror_views(local, gview, box, axis))
        p_local += torch.softmax(mirrored.local_logits, 1).flip(axis + 2)
        p_global += torch.softmax(mirrored.global_logits, 1).flip(axis + 2)
    if flips:
        p_local, p_global = p_local / (1 + len(flips)), p_global / (1 + len(flips))
    return p_local, p_global, out.local_logits


@torch.no_grad()
def mpl_pseudo_labels(teacher: GlobalLocalUNet, views: Views, cfg: MplConfig) -> PseudoLabels:
    """The teacher's pseudo-labels of unmasked ``views``: argmax labels gated by ``cfg.confidence``, with
    foreground outside the organ taught as background when ``cfg.pseudo_label_clean_up`` asks for it."""
    p_local, p_global, logits = teacher_probabilities(
        teacher, views.local, views.global_view, views.box, flips=cfg.teacher_flips
    )
    conf_l, pseudo_l = p_local.max(1)
    conf_g, pseudo_g = p_global.max(1)
    pseudo_l, pseudo_g = clean_pseudo_labels(
        pseudo_l,
        pseudo_g,
        views.box,
        mode=cfg.pseudo_label_clean_up or LargestComponent.off,
        n_classes=p_local.shape[1],
    )
    weights = (conf_l >= cfg.confidence).float(), (conf_g >= cfg.confidence).float()
    return PseudoLabels(pseudo_l, pseudo_g, *weights, logits)


def mpl_student_loss(
    student: GlobalLocalUNet,
    views: Views,
    pseudo: PseudoLabels,
    cfg: MplConfig,
    generator: torch.Generator | None = None,
) -> StudentLoss:
    """The student's pseudo-label loss on block-masked views (and the unmasked ones with
    ``cfg.student_sees_unmasked``): local head + ``global_weight`` x global head + ``cosine_weight`` x
    local-global cosine term. The masks are drawn on the CPU from ``generator``. Without masks
    (``cfg.mask_ratio`` 0) the masked view is the plain one: it runs once, at the weight of the views it stands for.
    """
    local, gview, box = views.local, views.global_view, views.box
    if cfg.mask_ratio > 0:
        mask_l = block_mask(local.shape, cfg.mask_block, cfg.mask_ratio, generator).to(local.device)
        mask_g = block_mask(gview.shape, cfg.mask_block, cfg.mask_ratio, generator).to(local.device)
        inputs = [(local * mask_l, gview * mask_g, 1.0)]
        inputs += [(local, gview, 1.0)] if cfg.student_sees_unmasked else []
    else:
        inputs = [(local, gview, 2.0 if cfg.student_sees_unmasked else 1.0)]
    loss = torch.zeros((), device=local.device)
    for loc_in, glob_in, weight in inputs:
        out = student(loc_in, glob_in, box)
        view_loss = pseudo_label_loss(out.local_logits, pseudo.local, pseudo.local_weight, cfg.dice_weight)
        view_loss = view_loss + cfg.global_weight * pseudo_label_loss(
            out.global_logits, pseudo.global_, pseudo.global_weight, cfg.dice_weight
        )
        view_loss = view_loss + cfg.cosine_weight * cosine_consistency(out.local_features, out.global_context)
        loss = loss + weight * view_loss
    # agreement of the student's last view (unmasked when it sees one) with the teacher's labels
    agreement = float((out.local_logits.argmax(1) == pseudo.local).float().mean())
    return StudentLoss(loss, agreement)


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """Move the teacher's weights towards the student's (``momentum`` of the teacher kept); copy integer buffers."""
    for t, s in zip(teacher.state_dict().values(), student.state_dict().values(), strict=True):
        if t.dtype.is_floating_point:
            t.mul_(momentum).add_(s.detach(), alpha=1.0 - momentum)
        else:
            t.copy_(s)
