"""Label-free test-time adaptation of a source network to a batch of target scans.

Methods, chosen by name (:class:`models.terms.Method`):
- ``none``: the source network as it is.
- ``norm``: batch-norm statistics re-estimated on the target batch (a no-op for instance-normalised networks,
  which normalise every scan by its own statistics).
- ``tent``: entropy minimisation on the normalisation layers' affine parameters (Wang et al., ICLR 2021).
- ``mpl``: masked pseudo-labelling (MAPSeg, CVPR 2024): an EMA teacher labels unmasked global-local views, a
  student learns to reproduce those labels from masked and unmasked views, with the global auxiliary head and a
  local-global cosine term; the teacher follows the student by EMA and is the adapted model. The step itself
  is :mod:`models.mpl`, which the training modes share. A batch that the source network is as sure of as of
  its own held-out cases is left to it (:func:`batch_shift`, ``AdaptConfig.shift_ratio``).
None of them ever sees a label.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from pydantic import Field
from torch import nn

from models.inference import Predictor, predict_volume, torch_predictor
from models.mpl import ema_update, mpl_pseudo_labels, mpl_student_loss
from models.mpl_config import MplConfig
from models.network import GlobalLocalUNet
from models.postprocessing import foreground_entropy
from models.sampling import Views, global_view, make_views, mirror_randomly, pad_to_patch
from models.terms import Method

MIN_SHARE = 1e-3  # a structure below this share of a scan's global view is absent from it
Progress = Callable[[float], None]


class AdaptConfig(MplConfig):
    """Hyper-parameters of test-time adaptation; the defaults are the shipped settings."""

    # a step is compute-bound (about 5 to 7 s on 2 CPU cores): 70 keeps 15 scans within 10 minutes there
    steps: int = 70
    batch_size: int = 2  # views a step, one patch of a distinct scan each
    # a slice-wise plan's views a step (one slice each, every scan once before any twice): its training batch,
    # about the voxels of the volumetric plan's two patches
    slice_batch_size: int = 16
    lr: float = 2e-3
    tent_lr: float = 1e-3
    norm_batches: int = 12
    mpl_norm_statistics: bool = True
    # what the mpl student learns: every weight, or only the normalisation layers' affine parameters (as tent; an
    # ablation: it lost more on ACDC -> bSSFP and repaired LGE less, docs/benchmarks.md)
    mpl_parameters: Literal["all", "norm"] = "all"
    min_steps: int = 20
    settle_window: int = 30
    settle_tolerance: float = 0.02
    seed: int = 0
    # mpl re-adapts from the source weights with the next seed when a structure collapses across the batch
    restarts: int = 1
    collapse_ratio: float = 3.0
    collapse_scans: float = 0.25
    # mpl returns the source weights moved (1 - source_weight) of the way to the adapted ones (weight-space
    # ensembling, as WiSE-FT): a share of what the source segments well is kept. Not tent: its blend shrinks a
    # structure less than the guard's limit, so a scan the guard returns to the source slips through
    source_weight: float = Field(0.25, ge=0.0, lt=1.0)
    # mpl adapts only a batch on which the source network is less sure than on its held-out source cases: its mean
    # foreground entropy over the batch must exceed this multiple of the card's (``validation.foreground_entropy``);
    # a batch as familiar as its own domain is left to the source network (self-training lost on such batches,
    # docs/benchmarks.md "Familiar batches"). None, or a card without the entry: always adapt
    shift_ratio: float | None = Field(1.1, gt=0.0)


@dataclass
class AdaptResult:
    """The adapted network and the label-free signals recorded while adapting."""

    net: GlobalLocalUNet
    method: Method
    steps_run: int = 0
    seconds: float = 0.0
    stopped_early: bool = False
    restarts: int = 0
    collapsed: list[int] = field(default_factory=list)
    # the source network's mean foreground entropy on the batch, the card's on held-out source cases, their ratio
    shift: dict[str, float] = field(default_factory=dict)
    skipped: bool = False  # the batch looked as familiar as the source domain: the network is the source's
    history: list[dict[str, float]] = field(default_factory=list)
    snapshots: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)

    def snapshot(self, step: int, model: nn.Module, wanted: Sequence[int]) -> None:
        """Keep a copy of the adapted model's weights after ``step`` updates if ``step`` is wanted."""
        if step in wanted:
            self.snapshots[step] = {k: v.detach().clone() for k, v in model.state_dict().items()}


NORM_LAYERS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.GroupNorm)


def _batchnorms(net: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _norm_affine_parameters(net: nn.Module) -> list[nn.Parameter]:
    return [
        p for m in net.modules() if isinstance(m, NORM_LAYERS) for p in (m.weight, m.bias) if p is not None
    ]


def _learn_only(net: nn.Module, params: Sequence[nn.Parameter]) -> None:
    """Let gradients reach ``params`` only (``net.requires_grad_(True)`` lets them reach every weight again)."""
    learnt = {id(p) for p in params}
    for p in net.parameters():
        p.requires_grad_(id(p) in learnt)


def _device(net: nn.Module) -> torch.device:
    return next(net.parameters()).device


def _random_views(volumes: Sequence[np.ndarray], patch, cfg: AdaptConfig, rng: np.random.Generator) -> Views:
    """Global-local views of a random batch of distinct target volumes; for a slice-wise plan (patches one slice
    thick) ``slice_batch_size`` slices, the scans drawn in turns."""
    if patch[0] == 1:
        turns = -(-cfg.slice_batch_size // len(volumes))
        idx = np.concatenate([rng.permutation(len(volumes)) for _ in range(turns)])[: cfg.slice_batch_size]
    else:
        idx = rng.choice(len(volumes), size=min(cfg.batch_size, len(volumes)), replace=False)
    views = make_views([volumes[i] for i in idx], patch, rng)
    return mirror_randomly(views, cfg.view_flips, rng) if cfg.view_flips else views


@torch.no_grad()
def reestimate_norm_statistics(
    net: GlobalLocalUNet, volumes: Sequence[np.ndarray], patch: Sequence[int], cfg: AdaptConfig
) -> None:
    """Replace batch-norm running statistics by their average over views of the target volumes.

    Instance-normalised networks already normalise every view by its own statistics: nothing to re-estimate.
    """
    bns = _batchnorms(net)
    if not bns:
        return
    rng = np.random.default_rng(cfg.seed)
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average
    net.train()
    dev = _device(net)
    for _ in range(max(cfg.norm_batches, len(volumes))):
        v = _random_views(volumes, patch, cfg, rng)
        net(v.local.to(dev), v.global_view.to(dev), v.box.to(dev))
    for bn in bns:
        bn.momentum = 0.1
    net.eval()


def scan_foreground_entropies(
    predict: Predictor, volumes: Sequence[np.ndarray], patch: Sequence[int]
) -> list[float]:
    """:func:`~models.postprocessing.foreground_entropy` of a network's sliding-window prediction of each volume
    (model grid; ``predict``: the network as :func:`~models.inference.torch_predictor` or
    :func:`~models.inference.onnx_predictor` wraps it): how unsure the network is of what it segments."""
    return [foreground_entropy(predict_volume(v, predict, patch)) for v in volumes]


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    p = torch.softmax(logits, 1)
    return -(p * torch.log(p.clamp_min(1e-8))).sum(1)


def _tent(
    net: GlobalLocalUNet,
    volumes: Sequence[np.ndarray],
    patch,
    cfg: AdaptConfig,
    steps: int,
    progress: Progress,
    snapshot_steps: Sequence[int],
) -> AdaptResult:
    reestimate_norm_statistics(net, volumes, patch, cfg)
    params = _norm_affine_parameters(net)
    _learn_only(net, params)
    opt = torch.optim.Adam(params, lr=cfg.tent_lr)
    rng = np.random.default_rng(cfg.seed)
    dev = _device(net)
    result = AdaptResult(net=net, method=Method.TENT)
    result.snapshot(0, net, snapshot_steps)
    net.train()
    for step in range(steps):
        v = _random_views(volumes, patch, cfg, rng)
        out = net(v.local.to(dev), v.global_view.to(dev), v.box.to(dev))
        loss = _entropy(out.local_logits).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        result.history.append({"step": step, "entropy": float(loss.detach())})
        result.steps_run = step + 1
        result.snapshot(step + 1, net, snapshot_steps)
        progress(100.0 * (step + 1) / steps)
    net.requires_grad_(True)
    net.eval()
    return result


def _settled(history: list[dict[str, float]], cfg: AdaptConfig) -> bool:
    if len(history) < max(cfg.min_steps, 2 * cfg.settle_window):
        return False
    losses = [h["loss"] for h in history]
    recent = float(np.mean(losses[-cfg.settle_window :]))
    before = float(np.mean(losses[-2 * cfg.settle_window : -cfg.settle_window]))
    return abs(before - recent) <= cfg.settle_tolerance * max(before, 1e-8)


def _mpl(
    net: GlobalLocalUNet,
    volumes: Sequence[np.ndarray],
    patch,
    cfg: AdaptConfig,
    steps: int,
    progress: Progress,
    snapshot_steps: Sequence[int],
) -> AdaptResult:
    if cfg.mpl_norm_statistics:
        reestimate_norm_statistics(net, volumes, patch, cfg)
    student = net
    teacher = copy.deepcopy(net).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    # normalisation statistics stay those of the target batch: the masked views must not shift them
    student.eval()
    learnt = _norm_affine_parameters(student) if cfg.mpl_parameters == "norm" else list(student.parameters())
    _learn_only(student, learnt)
    opt = torch.optim.Adam(learnt, lr=cfg.lr)
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    dev = _device(student)
    result = AdaptResult(net=teacher, method=Method.MPL)
    result.snapshot(0, teacher, snapshot_steps)
    for step in range(steps):
        v = _random_views(volumes, patch, cfg, rng).to(dev)
        pseudo = mpl_pseudo_labels(teacher, v, cfg)
        loss, agreement = mpl_student_loss(student, v, pseudo, cfg, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema_update(teacher, student, cfg.ema)
        result.history.append(
            {
                "step": step,
                "loss": float(loss.detach()),
                "agreement": agreement,
                "teacher_entropy": float(_entropy(pseudo.teacher_logits).mean()),
                "confident_fraction": float(pseudo.local_weight.mean()),
            }
        )
        result.steps_run = step + 1
        result.snapshot(step + 1, teacher, snapshot_steps)
        progress(100.0 * (step + 1) / steps)
        if _settled(result.history, cfg):
            result.stopped_early = True
            progress(100.0)
            break
    student.requires_grad_(True)
    teacher.eval()
    return result


@torch.no_grad()
def structure_shares(net: GlobalLocalUNet, volumes: Sequence[np.ndarray], patch: Sequence[int]) -> np.ndarray:
    """Each structure's share of every scan's global view in the network's label map, (scans, structures).

    For a slice-wise plan the share is over the global views of all the scan's slices.

    The global head sees the global view only, so the local patch that goes with it may lie anywhere.
    """
    net.eval()
    dev = _device(net)
    shares = []
    for volume in volumes:
        if patch[0] == 1:  # slice-wise plan: the global views of every slice, not of one
            padded, _ = pad_to_patch(volume, patch)
            vt = torch.from_numpy(np.ascontiguousarray(padded))[None, None]
            gviews = torch.cat([global_view(vt, patch, z) for z in range(padded.shape[0])]).to(dev)
            box = torch.tensor([[0.0, 0.0, 0.0, 1.0, 1.0, 1.0]], device=dev).expand(len(gviews), 6)
            labels = net(gviews, gviews, box).global_logits.argmax(1)
        else:
            v = make_views([volume], patch, np.random.default_rng(0)).to(dev)
            labels = net(v.local, v.global_view, v.box).global_logits.argmax(1)
        shares.append([float((labels == c).float().mean()) for c in range(1, net.config.out_channels)])
    return np.asarray(shares)


def shrunk_scans(source: np.ndarray, adapted: np.ndarray, cfg: AdaptConfig) -> tuple[np.ndarray, np.ndarray]:
    """Per structure: in how many scans it shrank more than ``collapse_ratio``-fold (or vanished), and in how many
    scans the source network finds it."""
    present = source >= MIN_SHARE
    return (present & (adapted * cfg.collapse_ratio < source)).sum(0), present.sum(0)


def collapsed_structures(source: np.ndarray, adapted: np.ndarray, cfg: AdaptConfig) -> list[int]:
    """Labels of the structures that shrank more than ``collapse_ratio``-fold, or vanished, in at least a
    ``collapse_scans`` fraction of the scans where the source network finds them."""
    shrunk, present = shrunk_scans(source, adapted, cfg)
    return [c + 1 for c in range(len(present)) if present[c] and shrunk[c] >= cfg.collapse_scans * present[c]]


def batch_shift(
    predict: Predictor,
    volumes: Sequence[np.ndarray],
    patch: Sequence[int],
    cfg: AdaptConfig,
    reference_entropy: float | None,
) -> dict[str, float]:
    """How much less sure the source network (``predict``) is of the batch than of its held-out source cases:
    its :func:`scan_foreground_entropies` averaged over the scans, the reference and their ratio; empty when
    there is no gate to decide (``cfg.shift_ratio`` unset, or no reference)."""
    if cfg.shift_ratio is None or not reference_entropy:
        return {}
    entropy = float(np.mean(scan_foreground_entropies(predict, volumes, patch)))
    return {
        "batch_entropy": round(entropy, 4),
        "reference_entropy": round(reference_entropy, 4),
        "ratio": round(entropy / reference_entropy, 3),
    }


def _mpl_with_restarts(
    net: GlobalLocalUNet,
    work: GlobalLocalUNet,
    volumes: Sequence[np.ndarray],
    patch: Sequence[int],
    cfg: AdaptConfig,
    steps: int,
    progress: Progress,
    snapshot_steps: Sequence[int],
) -> AdaptResult:
    """``mpl`` from ``work`` (a copy of ``net``), again from ``net`` with the next seed while a structure
    collapses across the batch, up to ``cfg.restarts`` times."""
    source_shares = structure_shares(work, volumes, patch) if cfg.restarts and steps else None
    attempt_progress = progress if source_shares is None else (lambda pct: progress(min(pct, 99.0)))
    run = cfg
    for attempt in range(cfg.restarts + 1):
        if attempt:  # a structure collapsed: start again from the source weights with the next seed
            run = cfg.model_copy(update={"seed": cfg.seed + attempt})
            torch.manual_seed(run.seed)
            work = copy.deepcopy(net)
        result = _mpl(work, volumes, patch, run, steps, attempt_progress, snapshot_steps)
        result.restarts = attempt
        if source_shares is None:
            break
        result.collapsed = collapsed_structures(
            source_shares, structure_shares(result.net, volumes, patch), cfg
        )
        if not result.collapsed:
            break
    return result


def adapt(
    net: GlobalLocalUNet,
    volumes: Sequence[np.ndarray],
    patch: Sequence[int],
    *,
    method: Method | str = Method.MPL,
    steps: int | None = None,
    cfg: AdaptConfig | None = None,
    progress: Progress | None = None,
    snapshot_steps: Sequence[int] = (),
    reference_entropy: float | None = None,
    source_predictor: Predictor | None = None,
) -> AdaptResult:
    """Adapt a copy of ``net`` to the normalised target ``volumes`` (model grid, (z, y, x)) without labels.

    ``snapshot_steps``: keep the adapted weights after these numbers of updates (for Dice-vs-steps curves).
    ``reference_entropy``: the source network's mean foreground entropy on its held-out source cases (the card's
    ``validation.foreground_entropy``). With it, ``mpl`` first measures the batch's (:func:`batch_shift`) and
    leaves the network as it is, ``skipped``, unless the batch's exceeds ``cfg.shift_ratio`` times the reference;
    that pass runs ``source_predictor`` when given (``net`` as it is served, e.g. its ONNX model, one prediction per
    window as the reference was measured), else ``net`` in eager PyTorch.
    ``mpl`` compares each structure's share of every scan before and after adapting; if one collapsed across the
    batch (``collapsed_structures``) it adapts again from the source weights with the next seed, up to
    ``cfg.restarts`` times, and reports the restarts and any structure still collapsed. Progress reaches 100 once,
    when the last attempt is done; a restart starts it again from 0. ``mpl`` then blends the adapted weights
    (and every snapshot) with the source's by ``cfg.source_weight`` (:func:`blend_weights`).
    """
    try:
        method = Method(method)
    except ValueError:
        raise ValueError(f"unknown adaptation method {method!r}; choose one of {', '.join(Method)}") from None
    cfg = cfg or AdaptConfig()
    steps = cfg.steps if steps is None else steps
    if steps < 0:
        raise ValueError("steps must be >= 0")
    progress = progress or (lambda pct: None)
    torch.manual_seed(cfg.seed)
    work = copy.deepcopy(net)
    start = time.perf_counter()
    if not method.takes_steps:
        if method is Method.NORM:
            reestimate_norm_statistics(work, volumes, patch, cfg)
        result = AdaptResult(net=work.eval(), method=method)
        result.snapshot(0, work, snapshot_steps)
    elif method is Method.TENT:
        result = _tent(work, volumes, patch, cfg, steps, progress, snapshot_steps)
    else:
        gate = source_predictor or torch_predictor(work.eval())
        shift = batch_shift(gate, volumes, patch, cfg, reference_entropy) if steps else {}
        if shift and shift["ratio"] <= cfg.shift_ratio:
            result = AdaptResult(net=work.eval(), method=method, shift=shift, skipped=True)
            result.snapshot(0, work, snapshot_steps)
        else:
            result = _mpl_with_restarts(net, work, volumes, patch, cfg, steps, progress, snapshot_steps)
            result.shift = shift
    if method is Method.MPL and cfg.source_weight and not result.skipped:
        source = net.state_dict()
        result.net.load_state_dict(blend_weights(source, result.net.state_dict(), cfg.source_weight))
        result.snapshots = {
            step: blend_weights(source, state, cfg.source_weight) for step, state in result.snapshots.items()
        }
    progress(100.0)
    result.seconds = time.perf_counter() - start
    return result


def blend_weights(
    source: dict[str, torch.Tensor], adapted: dict[str, torch.Tensor], source_weight: float
) -> dict[str, torch.Tensor]:
    """``source_weight`` x the source's floating-point weights + the rest x the adapted ones; other buffers
    (counters) as adapted."""
    return {
        k: source_weight * source[k] + (1.0 - source_weight) * v if v.is_floating_point() else v
        for k, v in adapted.items()
    }
