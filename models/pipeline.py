"""Adapt a bundle to a batch of scans and segment every scan: the one entry point of the CLI and the workers."""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import SimpleITK as sitk
import torch

from models.adaptation import AdaptConfig, AdaptResult, adapt
from models.bundle import Bundle, ModelCard, export_onnx, save_bundle
from models.guard import (
    GuardConfig,
    VolumeRanges,
    dice_agreement,
    implausible_change,
    structure_volumes,
)
from models.inference import flip_ensemble, onnx_predictor, onnx_session, predict_volume
from models.io import case_name, read_image, write_image
from models.postprocessing import (
    LargestComponent,
    foreground_connectedness,
    keep_largest_component,
    normalised_entropy,
)
from models.preprocessing import PreparedScan, label_image, prepare, probabilities_to_original
from models.terms import Method, Phase

ProgressCallback = Callable[[str, float], None]


@dataclass
class ScanResult:
    """Where one scan's outputs were written, and what the guard and the quality signals say.

    ``source_label_file`` (adapting methods) and ``uncertainty_file`` (when asked for) name files beside
    the label map: the source model's label map and the voxel-wise normalised entropy (0-1).
    """

    case: str
    label_path: Path
    json_path: Path
    volumes_ml: dict[str, float]
    quality: dict[str, float]
    fallback: bool
    fallback_reason: str | None
    seconds: float
    source_label_file: str | None = None
    uncertainty_file: str | None = None


def resolve_device(device: str) -> str:
    """``cuda`` when asked for and present, else ``cpu``."""
    return "cuda" if device.startswith("cuda") and torch.cuda.is_available() else "cpu"


class SegmentSettings(NamedTuple):
    """How a batch is segmented: the label maps' clean-up, the source model's flip-ensemble axes and the
    adaptation settings (whose ``view_flips`` are the adapted network's)."""

    largest_component: LargestComponent
    flips: tuple[int, ...]
    adapt: AdaptConfig


def segment_settings(
    card: ModelCard,
    largest_component: LargestComponent | str | None = None,
    adapt_config: AdaptConfig | None = None,
    flips: Sequence[int] | None = None,
) -> SegmentSettings:
    """The label maps' clean-up and the source model's flip ensemble (default: the card's), and adaptation
    settings whose pseudo-label clean-up follows the label maps' unless they set their own."""
    largest_component = LargestComponent(largest_component or card.largest_component)
    flips = card.test_time_flips if flips is None else tuple(flips)
    adapt_config = (adapt_config or AdaptConfig()).with_anatomy(largest_component)
    return SegmentSettings(largest_component, flips, adapt_config)


def load_scans(
    inputs: Sequence[str | Path], bundle: Bundle, case_names: Sequence[str] | None
) -> list[PreparedScan]:
    """Read, validate and prepare every input; case names must be unique."""
    names = list(case_names) if case_names else [case_name(p) for p in inputs]
    if len(set(names)) != len(names):
        raise ValueError(f"case names must be unique, got {names}")
    card = bundle.card
    return [
        prepare(read_image(p), n, card.target_spacing, card.normalisation)
        for p, n in zip(inputs, names, strict=True)
    ]


def _quality(
    probs: np.ndarray,
    entropy: np.ndarray,
    labels: np.ndarray,
    source_labels: np.ndarray,
    connectedness: float,
) -> dict[str, float]:
    fg = labels > 0
    return {
        "foreground_connectedness": round(connectedness, 4),
        "mean_entropy_foreground": round(float(entropy[fg].mean()) if fg.any() else 0.0, 4),
        "mean_confidence_foreground": round(float(probs.max(0)[fg].mean()) if fg.any() else 0.0, 4),
        "agreement_with_source": round(dice_agreement(labels, source_labels, probs.shape[0]), 4),
    }


def segment_batch(
    inputs: Sequence[str | Path],
    bundle: Bundle,
    out_dir: str | Path,
    *,
    method: Method | str = Method.MPL,
    steps: int | None = None,
    device: str = "cpu",
    progress: ProgressCallback | None = None,
    case_names: Sequence[str] | None = None,
    save_adapted: str | Path | None = None,
    adapt_config: AdaptConfig | None = None,
    guard_config: GuardConfig | None = None,
    uncertainty: bool = False,
    largest_component: LargestComponent | None = None,
    flips: Sequence[int] | None = None,
) -> list[ScanResult]:
    """Adapt ``bundle`` to all ``inputs`` together, then segment each onto its own grid in ``out_dir``.

    ``progress`` hears ``(Phase.ADAPTING, percent)`` while adapting (never with ``none``), then
    ``(Phase.SEGMENTING, 0)`` before the first scan and the share of scans done after each one; a scan's
    ``seconds`` is the time spent segmenting it.

    Adapting methods also write the source model's label map, ``<case>_source.nii.gz``, from the predictions
    the guard compares with; ``uncertainty`` writes the shown prediction's normalised entropy (0-1),
    ``<case>_uncertainty.nii.gz``. Both are named in the case's JSON (``source_label_file``,
    ``uncertainty_file``).

    ``mpl`` leaves a batch that the source network is as sure of as of its held-out source cases to the source
    network (``AdaptConfig.shift_ratio``): nothing is adapted, saved or compared, every scan is a fallback whose
    reason says so, and its JSON has ``adaptation_skipped`` and the ``adaptation_shift``.

    ``largest_component``: connected-component clean-up of the label maps (default: the model card's); unless
    ``adapt_config`` says otherwise, ``mpl`` cleans its pseudo-labels up the same way. ``flips``: the axes of
    the source model's flip ensemble (default: the card's). An adapted network segments with the ensemble along
    ``adapt_config.view_flips``, the axes its views were mirrored along (default: none, one prediction): a
    network adapted on unmirrored views has not adapted its mirror images, which stay near the source model's.
    """
    progress = progress or (lambda phase, pct: None)
    method = Method(method)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(device)
    card = bundle.card
    largest_component, flips, adapt_config = segment_settings(card, largest_component, adapt_config, flips)
    scans = load_scans(inputs, bundle, case_names)
    patch = card.patch_size
    served = onnx_predictor(onnx_session(bundle.onnx_path, device))  # one prediction per window
    source = flip_ensemble(served, flips)

    adapted: AdaptResult | None = None
    predictor = None  # the adapted network's, when there is one
    with tempfile.TemporaryDirectory() as tmp:
        if method.adapts:
            progress(Phase.ADAPTING, 0.0)
            net = bundle.load_network(device)
            adapted = adapt(
                net,
                [s.array for s in scans],
                patch,
                method=method,
                steps=steps,
                cfg=adapt_config,
                progress=lambda p: progress(Phase.ADAPTING, p),
                reference_entropy=card.validation.get("foreground_entropy"),
                source_predictor=served,
            )
            if not adapted.skipped:
                predictor = flip_ensemble(
                    onnx_predictor(
                        onnx_session(export_onnx(adapted.net, patch, Path(tmp) / "a.onnx"), device)
                    ),
                    adapt_config.view_flips,
                )
                if save_adapted:
                    save_adapted_bundle(
                        bundle, adapted, [s.case for s in scans], save_adapted, flips=adapt_config.view_flips
                    )
            progress(Phase.ADAPTING, 100.0)

        progress(Phase.SEGMENTING, 0.0)
        results = []
        for i, scan in enumerate(scans):
            start = time.perf_counter()
            results.append(
                _segment_one(
                    scan,
                    names=card.labels,
                    patch=patch,
                    source=source,
                    adapted_predictor=predictor,
                    out_dir=out_dir,
                    guard_config=guard_config,
                    source_ranges=card.label_volumes_ml,
                    uncertainty=uncertainty,
                    largest_component=largest_component,
                )
            )
            results[-1].seconds = round(time.perf_counter() - start, 3)
            if adapted and adapted.skipped:
                results[-1].fallback, results[-1].fallback_reason = True, _not_adapted(adapted, adapt_config)
            _write_json(results[-1], bundle, method, adapted, flips, adapt_config.view_flips)
            progress(Phase.SEGMENTING, 100.0 * (i + 1) / len(scans))
    return results


def _not_adapted(adapted: AdaptResult, cfg: AdaptConfig) -> str:
    """The fallback reason of a scan in a batch the shift gate left to the source model."""
    return (
        "not adapted: the batch looks as familiar as the source domain (foreground entropy "
        f"{adapted.shift['ratio']:.2f}x the held-out cases', <= {cfg.shift_ratio}x)"
    )


def _to_labels(probs: np.ndarray, largest_component: LargestComponent) -> tuple[np.ndarray, float]:
    """Argmax label map after the connected-component clean-up, and the argmax's foreground connectedness."""
    labels = probs.argmax(0).astype(np.uint8)
    return keep_largest_component(labels, probs.shape[0], largest_component), foreground_connectedness(labels)


def _segment_one(
    scan: PreparedScan,
    *,
    names: dict[int, str],
    patch,
    source,
    adapted_predictor,
    out_dir: Path,
    guard_config: GuardConfig | None,
    source_ranges: VolumeRanges,
    uncertainty: bool,
    largest_component: LargestComponent,
) -> ScanResult:
    src_probs = probabilities_to_original(predict_volume(scan.array, source, patch), scan)
    src_labels, src_connectedness = _to_labels(src_probs, largest_component)
    probs, labels, connectedness = src_probs, src_labels, src_connectedness
    volumes = src_volumes = structure_volumes(src_labels, names, scan.voxel_ml)
    fallback_reason = None
    if adapted_predictor is not None:
        probs = probabilities_to_original(predict_volume(scan.array, adapted_predictor, patch), scan)
        labels, connectedness = _to_labels(probs, largest_component)
        volumes = structure_volumes(labels, names, scan.voxel_ml)
        fallback_reason = implausible_change(
            src_volumes,
            volumes,
            cfg=guard_config,
            connectedness=(src_connectedness, connectedness),
            source_ranges=source_ranges,
        )
        if fallback_reason:
            probs, labels, volumes, connectedness = src_probs, src_labels, src_volumes, src_connectedness
    entropy = normalised_entropy(probs)
    quality = _quality(probs, entropy, labels, src_labels, connectedness)
    label_path = write_image(label_image(labels, scan.original), out_dir / f"{scan.case}.nii.gz")
    source_label_file = uncertainty_file = None
    if adapted_predictor is not None:
        source_label_file = f"{scan.case}_source.nii.gz"
        write_image(label_image(src_labels, scan.original), out_dir / source_label_file)
    if uncertainty:
        uncertainty_file = f"{scan.case}_uncertainty.nii.gz"
        img = sitk.GetImageFromArray(np.clip(entropy, 0.0, 1.0).astype(np.float32))
        img.CopyInformation(scan.original)
        write_image(img, out_dir / uncertainty_file)
    return ScanResult(
        case=scan.case,
        label_path=label_path,
        json_path=out_dir / f"{scan.case}.json",
        volumes_ml=volumes,
        quality=quality,
        fallback=fallback_reason is not None,
        fallback_reason=fallback_reason,
        seconds=0.0,
        source_label_file=source_label_file,
        uncertainty_file=uncertainty_file,
    )


def _write_json(
    result: ScanResult,
    bundle: Bundle,
    method: str,
    adapted: AdaptResult | None,
    flips: Sequence[int],
    adapted_flips: Sequence[int],
) -> None:
    record = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(result).items()}
    record.update(
        model=bundle.ref,
        method=method,
        test_time_flips=list(flips),
        adapted_flips=list(adapted_flips) if adapted and not adapted.skipped else [],
        steps_run=adapted.steps_run if adapted else 0,
        adaptation_seconds=round(adapted.seconds, 3) if adapted else 0.0,
        adaptation_stopped_early=adapted.stopped_early if adapted else False,
        adaptation_restarts=adapted.restarts if adapted else 0,
        adaptation_collapsed=[bundle.card.labels[c] for c in adapted.collapsed] if adapted else [],
        adaptation_skipped=adapted.skipped if adapted else False,
        adaptation_shift=adapted.shift if adapted else {},
        adaptation_signals=adapted.history[-1] if adapted and adapted.history else {},
    )
    result.json_path.write_text(json.dumps(record, indent=2) + "\n")


def save_adapted_bundle(
    bundle: Bundle,
    adapted: AdaptResult,
    cases: Sequence[str],
    out_dir: str | Path,
    *,
    flips: Sequence[int] = (),
) -> Bundle:
    """Save the adapted network as a new bundle whose card names its parent and the batch, and asks for the flip
    ensemble along ``flips``, the axes its views were mirrored along."""
    card = bundle.card
    parent = {
        "name": card.name,
        "version": card.version,
        "weights_sha256": card.weights_sha256,
        "adaptation": adapted.method,
        "steps_run": adapted.steps_run,
        "batch": list(cases),
    }
    batch_id = hashlib.sha256("\n".join(cases).encode()).hexdigest()[:8]
    new_card = card.model_copy(
        update={
            "version": f"{card.version}-{adapted.method}-{batch_id}",
            "parent": parent,
            "test_time_flips": tuple(flips),
        }
    )
    return save_bundle(adapted.net, new_card, out_dir)
