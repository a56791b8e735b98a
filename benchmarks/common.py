"""What the adaptation benchmarks share: the task table, a task's batch, Dice of a scan against its labels, the
machine, the command line and JSON output."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from models.postprocessing import LargestComponent
from models.terms import Method

if TYPE_CHECKING:
    from models.bundle import ModelCard
    from models.pipeline import SegmentSettings

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("TTASEG_DATA", ROOT.parent / "shared" / "data"))
RESULTS = ROOT / "benchmarks" / "results"

TASKS = {
    # name: (bundle, target images, target labels (measuring only))
    "bssfp-lge": ("cardiac-bssfp", "cardiac/mscmr_lge/images", "cardiac/mscmr_lge/labels"),
    "acdc-bssfp": ("cardiac-acdc", "cardiac/mscmr_bssfp/images", "cardiac/mscmr_bssfp/labels"),
    "acdc-lge": ("cardiac-acdc", "cardiac/mscmr_lge/images", "cardiac/mscmr_lge/labels"),
    # in-domain: the source's own scans; its held-out cases are the last by name (--skip 20 --limit 5 for
    # bSSFP, --skip 54 --limit 6 for ACDC), the cards' validation split
    "bssfp-bssfp": ("cardiac-bssfp", "cardiac/mscmr_bssfp/images", "cardiac/mscmr_bssfp/labels"),
    "acdc-acdc": ("cardiac-acdc", "cardiac/acdc_cine/images", "cardiac/acdc_cine/labels"),
}
STEP_METHODS = [m.value for m in Method if m.takes_steps]  # the methods whose Dice depends on the steps


def machine() -> dict:
    """What the numbers were measured on."""
    import torch

    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        ),
        platform.processor(),
    )
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def command(module: str) -> str:
    """The command line that ran this benchmark, for its JSON."""
    return " ".join([f"python -m {module}", *sys.argv[1:]])


def label_dir(task: str) -> Path:
    """The folder of the task's target labels (for measuring only)."""
    return DATA / TASKS[task][2]


def task_inputs(task: str, *, skip: int = 0, limit: int | None = None) -> tuple[list[Path], set[str]]:
    """The task's target scans, labelled first then by name (after ``skip``, at most ``limit``), and the names
    of the labelled cases."""
    from models.io import case_name

    labelled = {case_name(p) for p in label_dir(task).iterdir()}
    inputs = sorted((DATA / TASKS[task][1]).iterdir(), key=lambda p: (case_name(p) not in labelled, p.name))
    return inputs[skip : skip + limit if limit else None], labelled


def task_bundle(task: str, bundle: str | None = None):
    """The bundle asked for, else the task's source bundle (verified)."""
    from models.bundle import resolve_bundle

    return resolve_bundle(bundle or TASKS[task][0])


def scored(per_scan: dict[str, float]) -> dict:
    """Per-scan Dice with its mean, as the benchmark JSONs record a point."""
    return {"mean_dice": round(float(np.mean(list(per_scan.values()))), 4), "scans": per_scan}


def scan_dice(
    probs: np.ndarray,
    scan,
    label_dir: Path,
    *,
    labels: dict[int, str],
    largest_component: LargestComponent,
) -> float:
    """Mean Dice over structures of a labelled scan's segmentation from class probabilities on the model grid."""
    import SimpleITK as sitk

    from models.evaluation import evaluate_case
    from models.postprocessing import keep_largest_component
    from models.preprocessing import label_image, probabilities_to_original

    argmax = probabilities_to_original(probs, scan).argmax(0).astype(np.uint8)
    pred = label_image(keep_largest_component(argmax, len(labels), largest_component), scan.original)
    ref = sitk.ReadImage(str(next(label_dir.glob(f"{scan.case}.*"))))
    metrics = evaluate_case(pred, ref, labels)
    return round(float(np.nanmean([m["dice"] for m in metrics.values()])), 4)


def dice_per_scan(
    net, scans, label_dir: Path, card: ModelCard, settings: SegmentSettings | None = None
) -> dict[str, float]:
    """Mean Dice over structures for each labelled scan segmented by ``net`` as the product segments with
    ``card`` (eager, on the scan's own grid, with the clean-up and flip ensemble of ``settings``, by default the
    card's)."""
    from models.inference import flip_ensemble, predict_volume, torch_predictor
    from models.pipeline import segment_settings

    settings = settings or segment_settings(card)
    predict = flip_ensemble(torch_predictor(net.eval()), settings.flips)
    return {
        scan.case: scan_dice(
            predict_volume(scan.array, predict, card.patch_size),
            scan,
            label_dir,
            labels=card.labels,
            largest_component=settings.largest_component,
        )
        for scan in scans
    }


def write_json(path: Path, report: dict) -> Path:
    """Write a report as indented JSON, creating the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path


def add_task_arguments(parser: argparse.ArgumentParser, *, limit: int | None) -> None:
    """``--task``, ``--bundle``, ``--limit`` and ``--skip``: which batch a benchmark runs on."""
    parser.add_argument("--task", choices=sorted(TASKS), default="bssfp-lge")
    parser.add_argument("--bundle", default=None, help="bundle name or folder (default: the task's)")
    parser.add_argument(
        "--limit", type=int, default=limit, help="batch: N target scans (after --skip), labelled first"
    )
    parser.add_argument("--skip", type=int, default=0, help="leave out the first N target scans")
